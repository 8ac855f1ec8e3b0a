
…"%#GET"/v1/ai/chat*api.example.comZ\
Z
envoy.filters.http.jwt_authn:
8
jwt_payload)*'

subuser-1

org_id
acct_pro