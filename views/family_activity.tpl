%# Recent activity (included by family.tpl): the latest changes, newest first, with the link that made each.
<section id="activity" class="card" tabindex="0" aria-labelledby="activity-title">
<h2 id="activity-title">Recent activity</h2>
% if not changes:
<p class="muted">Nothing logged yet.</p>
% else:
<table class="activity">
<thead><tr><th scope="col">Changed</th><th scope="col">Entry</th><th scope="col">By</th></tr></thead>
<tbody>
% for change in changes:
<tr class="{{'deleted' if change['deleted'] else 'live'}}">
  <td>{{when(change['updated_at'])}}</td>
  <td><a class="event" data-type="{{change['type']}}" title="{{change['type']}}: history" href="/admin/families/{{family['id']}}/entries/{{change['id']}}/history">{{change['value']}}</a> <small class="muted">at {{when(change['ts'])}}</small>
% if change['deleted']:
    <span class="badge">deleted</span>
% end
  </td>
  <td>{{change['by'] or '—'}}</td>
</tr>
% end
</tbody>
</table>
% end
<p class="meta"><a href="/admin/families/{{family['id']}}/deleted">Recently deleted</a> · each entry opens its history</p>
</section>
