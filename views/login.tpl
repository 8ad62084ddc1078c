%# Login form: expects error (str or None), username_value.
% rebase('base.tpl', title='Log in')
<main class="narrow">
<h1>babytrackd</h1>
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<form method="post" action="/admin/login">
<label>Username <input name="username" value="{{username_value}}" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form>
</main>
