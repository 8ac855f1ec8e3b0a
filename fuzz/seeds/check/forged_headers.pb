
~"|zGET
	x-api-keydemo-pro-key 
x-tollgate-account
acct_other
X-Tollgate-Plangold"/v1/export/x*api.example.com