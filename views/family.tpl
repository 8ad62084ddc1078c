%# Family page: expects family, date, prev, next, summary (hours with sleep), chart, nights, links, online,
%# config, plan, planned (the plan's sleep as wall-clock minutes) and within (its part in an hour),
%# notes, day_notes (the shown day's), editor (button rows), changes, form (what each form shows),
%# errors (section -> message), zone_options, now, csrf,
%# and the formatters hm (minutes), clock (ms -> 19:42) and when (ms -> 'yesterday 19:42').
% rebase('base.tpl', title=family['name'])
<main>
<div class="heading">
  <div>
    <p class="crumbs"><a href="/admin">Clients</a></p>
    <h1>{{family['name']}}
% if family['archived']:
      <span class="badge">archived</span>
% end
    </h1>
    <p class="muted">Times in {{family['tz']}}</p>
  </div>
  <p class="actions">
    <a href="/admin/families/{{family['id']}}/export.csv">Export CSV</a>
    <a href="/admin/families/{{family['id']}}/export.json">Export JSON</a>
    <button type="button" class="link" data-print hidden>Print</button>
  </p>
</div>
% if family['notes']:
<p class="notes">{{family['notes']}}</p>
% end
% include('family_day.tpl')
% include('family_chart.tpl')
% include('family_nights.tpl')
<div class="columns">
% include('family_plan.tpl')
% include('family_notes.tpl')
</div>
<div class="columns">
% include('family_links.tpl')
% include('family_activity.tpl')
</div>
% include('family_settings.tpl')
% include('family_import.tpl')
</main>
