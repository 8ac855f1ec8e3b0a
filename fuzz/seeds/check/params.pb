
O"MKGET
	x-api-keydemo-pro-key"/v1/ai;jsessionid=1/chat*api.example.com