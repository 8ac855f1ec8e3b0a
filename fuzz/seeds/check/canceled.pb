
F"DBGET
	x-api-keydemo-canceled-key"
/v1/search*api.example.com