
L"JHGET
	x-api-keydemo-pro-key"/public/../v1/ai/chat*api.example.com