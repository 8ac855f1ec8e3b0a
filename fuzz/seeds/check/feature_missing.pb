
B"@>GET
	x-api-keydemo-free-key"
/v1/export*api.example.com