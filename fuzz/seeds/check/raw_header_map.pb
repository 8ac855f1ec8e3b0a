
g"ecGET"
/v1/search*api.example.comj?

	x-api-keydemo-pro-key
"
x-tollgate-billing-warningnone