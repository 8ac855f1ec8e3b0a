
%"#!GET"	/public/x*api.example.com