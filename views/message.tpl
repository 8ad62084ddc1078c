%# A plain message page: expects title, message.
% rebase('base.tpl', title=title)
<main class="narrow">
<h1>{{title}}</h1>
<p>{{message}}</p>
</main>
