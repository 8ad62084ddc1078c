%# Dashboard: expects families (with today), show_archived, csrf, username.
% rebase('base.tpl', title='Clients')
<main>
<h1>Clients</h1>
<ul>
% for f in families:
<li><a href="/admin/families/{{f['id']}}">{{f['name']}}</a></li>
% end
</ul>
<form method="post" action="/admin/families">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Name <input name="name" required maxlength="200"></label>
<button type="submit">Add client</button>
</form>
</main>
