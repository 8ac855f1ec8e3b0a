
C"A?POST
	x-api-keydemo-wallet-key"/v1/ai/x*api.example.com