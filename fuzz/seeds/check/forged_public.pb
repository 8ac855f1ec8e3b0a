
N"LJGET
x-tollgate-degradedno
	x-api-keyk"/public*api.example.com