
"
x-tollgateé