
s"qoGET
	x-api-keydemo-pro-key0
authorizationBasic eA==,Bearer demo-free-key"
/v1/search*api.example.com