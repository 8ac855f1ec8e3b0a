
P"NLGET
	x-api-keydemo-pro-key"/public/%2e%2e/v1/ai/chat*api.example.com