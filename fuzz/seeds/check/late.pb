
B"@>GET
	x-api-keydemo-late-key"
/v1/search*api.example.com