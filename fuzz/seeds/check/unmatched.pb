
=";9GET
	x-api-keydemo-pro-key"/admin*api.example.com