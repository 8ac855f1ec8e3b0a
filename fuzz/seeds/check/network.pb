
$
"" spiffe://cluster.local/ns/a/sa/b