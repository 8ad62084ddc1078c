%# Dashboard: expects families (family rows with today, seen, states and flags in words; flagged first), show_archived, hm,
%# zone_options, form (name, notes, tz of the Add client form), error (its message or None), csrf, turn (gevent.idle:
%# the sockets get the loop between slices of 50 rows).
% rebase('base.tpl', title='Clients')
<main>
<div class="heading">
  <h1>Clients</h1>
  <p class="actions">
% if show_archived:
    <a href="/admin">Hide archived</a>
% else:
    <a href="/admin?archived=1">Show archived</a>
% end
  </p>
</div>

% if families:
<table class="clients">
<thead><tr><th>Client</th><th>Last activity</th><th>Now</th><th>Sleep today</th><th>Feeds</th><th>Nappies</th></tr></thead>
<tbody>
% for n, f in enumerate(families):
% if n and n % 50 == 0:
%   turn()
% end
<tr>
  <td class="client"><a href="/admin/families/{{f['id']}}">{{f['name']}}</a>
% if f['archived']:
    <span class="badge">archived</span>
% end
% if f['flags']:
    <ul class="flags">
% for words in f['flags']:
      <li>{{words}}</li>
% end
    </ul>
% end
  </td>
  <td data-label="Last activity">{{f['seen']}}</td>
  <td data-label="Now">
% for state in f['states']:
    <span class="state">{{state}}</span>
% end
% if not f['states']:
    <span class="muted">—</span>
% end
  </td>
  <td data-label="Sleep today">{{hm(f['today']['sleep_minutes'])}}</td>
  <td data-label="Feeds">{{f['today']['feeds']}}</td>
  <td data-label="Nappies">{{f['today']['wet']}} wet · {{f['today']['dirty']}} dirty</td>
</tr>
% end
</tbody>
</table>
% else:
<p class="empty">No clients yet. Add the first one below.</p>
% end

<details class="card" id="add"{{' open' if error or not families else ''}}>
<summary>Add client</summary>
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<form method="post" action="/admin/families/new" class="stack">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Name <input name="name" value="{{form['name']}}" required maxlength="200"></label>
<label>Notes <textarea name="notes" rows="3" maxlength="10000">{{form['notes']}}</textarea></label>
<label for="add-tz">Time zone</label>
% include('tz_select.tpl', id='add-tz', selected=form['tz'])
<button type="submit" class="primary">Add client</button>
</form>
</details>
</main>
