%# A plain message page: expects title, message.
% rebase('base.tpl', title=title)
<main class="narrow">
<section class="card">
<h1>{{title}}</h1>
<p>{{message}}</p>
% if get('username'):
<p><a href="/admin">Back to your clients</a></p>
% end
</section>
</main>
