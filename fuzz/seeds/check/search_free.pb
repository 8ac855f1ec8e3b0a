
F"DBGET
	x-api-keydemo-free-key"/v1/search?q=1*api.example.com