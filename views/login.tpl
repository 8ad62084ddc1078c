%# Login form: expects error (str or None), username_value.
% rebase('base.tpl', title='Log in')
<main class="narrow">
<section class="card">
<h1>Log in</h1>
<p class="muted">The consultant's pages of babytrackd.</p>
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<form method="post" action="/admin/login" class="stack">
<label>Username <input name="username" value="{{username_value}}" autocomplete="username" autocapitalize="none" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit" class="primary">Log in</button>
</form>
</section>
</main>
