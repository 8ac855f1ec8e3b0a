
D"B@GET
	x-api-keydemo-banned-key"
/v1/search*api.example.com