
N"LJPOST$
authorizationBearer demo-pro-key"/v1/ai/chat*api.example.com