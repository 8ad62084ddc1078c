%# Recently deleted: expects family, entries (a page of the last 30 days' tombstones, newest first, with restore_seq),
%# older (the `before` of the next page, or None), when, csrf.
% rebase('base.tpl', title='Recently deleted · ' + family['name'])
<main>
<div class="heading">
  <div>
    <p class="crumbs"><a href="/admin/families/{{family['id']}}">{{family['name']}}</a></p>
    <h1>Recently deleted</h1>
    <p class="muted">Entries deleted in the last 30 days, newest first. Times in {{family['tz']}}.</p>
  </div>
</div>
% if not entries:
<p class="empty">Nothing was deleted in the last 30 days.</p>
% else:
<section class="card">
<table class="activity">
<thead><tr><th scope="col">Deleted</th><th scope="col">Entry</th><th scope="col">Deleted by</th><th scope="col"><span class="visually-hidden">Restore</span></th></tr></thead>
<tbody>
% for entry in entries:
<tr>
  <td>{{when(entry['updated_at'])}}</td>
  <td><a class="event" data-type="{{entry['type']}}" href="/admin/families/{{family['id']}}/entries/{{entry['id']}}/history">{{entry['value']}}</a>
    <small class="muted">at {{when(entry['ts'])}}</small></td>
  <td>{{entry['by'] or '—'}}</td>
  <td>
% if entry['restore_seq']:
    <form method="post" action="/admin/families/{{family['id']}}/entries/{{entry['id']}}/restore" class="inline">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <input type="hidden" name="seq" value="{{entry['restore_seq']}}">
      <input type="hidden" name="back" value="deleted">
      <button type="submit">Restore</button>
    </form>
% end
  </td>
</tr>
% end
</tbody>
</table>
</section>
% if older:
<p class="actions"><a href="?before={{older}}" rel="next">Older deletions →</a></p>
% end
% end
</main>
