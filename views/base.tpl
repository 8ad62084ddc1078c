%# Layout: expects title, base; username and csrf when logged in. The only place {{!...}} is used.
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · babytrackd</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/admin.css">
<script src="/static/admin.js" defer></script>
</head>
<body>
<header class="top">
  <a class="brand" href="/admin">babytrackd</a>
% if get('username'):
  <nav>
    <a href="/admin">Clients</a>
    <form method="post" action="/admin/logout" class="inline">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit" class="link">Log out {{username}}</button>
    </form>
  </nav>
% end
</header>
{{!base}}
</body>
</html>
