%# Family detail: expects family, date, summary, links, online, config, changes, csrf.
% rebase('base.tpl', title=family['name'])
<main>
<h1>{{family['name']}}</h1>
</main>
