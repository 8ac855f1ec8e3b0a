
‰"†ƒGET"
/v1/search*api.example.comj_

	x-api-keydemo-pro-key

authorization
Basic eA==
%
authorizationBearer demo-free-key