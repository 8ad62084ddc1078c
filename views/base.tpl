<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · babytrackd</title>
<link rel="stylesheet" href="/static/admin.css">
</head>
<body>
{{!base}}
</body>
</html>
