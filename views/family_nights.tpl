%# The Nights table (included by family.tpl): nights (rows of nights_table, newest first) against the plan when there is one.
<section id="nights" class="card">
<h2 id="nights-title">Nights</h2>
<p class="muted">Each row is a day from {{family['night_end']}} and the night after it, {{family['night_start']}} to {{family['night_end']}}.</p>
<div class="scroll" tabindex="0" role="region" aria-labelledby="nights-title">
<table class="nights">
<thead><tr><th scope="col">Date</th><th scope="col">Bedtime</th><th scope="col">Morning wake</th><th scope="col">Night sleep</th>
<th scope="col">Wakings</th><th scope="col">Awake</th><th scope="col">Longest stretch</th><th scope="col">Naps</th>
<th scope="col">Nap time</th><th scope="col">Wake windows</th></tr></thead>
<tbody>
% for night in nights:
<tr>
  <th scope="row">{{night['date'].strftime('%a')}} {{night['date'].day}} {{night['date'].strftime('%b')}}
% if not night['complete']:
    <small class="muted">so far</small>
% end
  </th>
  <td>{{night['bedtime']}}
% if night['bedtime_diff']:
    <small class="diff">{{night['bedtime_diff']}}</small>
% end
  </td>
  <td>{{night['wake']}}
% if night['wake_diff']:
    <small class="diff">{{night['wake_diff']}}</small>
% end
  </td>
  <td>{{night['sleep']}}</td>
  <td>{{night['wakings']}}</td>
  <td>{{night['awake']}}</td>
  <td>{{night['longest']}}</td>
  <td>{{night['naps']}}</td>
  <td>{{night['nap_time']}}</td>
  <td class="windows">
% for number, minutes in enumerate(night['windows']):
    {{'· ' if number else ''}}<span>{{minutes}}</span>
% end
% if not night['windows']:
    —
% end
  </td>
</tr>
% end
</tbody>
</table>
</div>
</section>
