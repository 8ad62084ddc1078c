%# The chosen day on the family page (included by family.tpl): date picker, totals, hourly grid.
<section id="day" class="card">
<div class="day-nav">
  <a href="/admin/families/{{family['id']}}?date={{prev}}#day" rel="prev">← Previous day</a>
  <form method="get" action="/admin/families/{{family['id']}}#day" class="inline">
    <label>Day <input type="date" name="date" value="{{date}}" required></label>
    <button type="submit">Show</button>
  </form>
  <a href="/admin/families/{{family['id']}}?date={{next}}#day" rel="next">Next day →</a>
</div>
<h2>{{date.strftime('%A')}} {{date.day}} {{date.strftime('%B %Y')}}</h2>
<dl class="totals">
  <div><dt>Sleep</dt><dd>{{hm(summary['totals']['sleep_minutes'])}}</dd></div>
  <div><dt>Feeds</dt><dd>{{summary['totals']['feeds']}}</dd></div>
  <div><dt>Wet nappies</dt><dd>{{summary['totals']['wet']}}</dd></div>
  <div><dt>Dirty nappies</dt><dd>{{summary['totals']['dirty']}}</dd></div>
% for name, category in summary['categories'].items():
% if name not in ('sleep', 'feed', 'nappy', 'note'):
  <div><dt>{{name}}</dt><dd>{{category['count']}}
% if 'minutes' in category:
    <small>{{hm(category['minutes'])}}</small>
% end
  </dd></div>
% end
% end
</dl>
% for note in day_notes:
<p class="coach-note"><strong>Your note</strong> {{note['text']}}</p>
% end
<table class="grid">
<caption>Hour by hour ({{len(summary['hours'])}} hours); shading is sleep{{', the outline the plan' if plan else ''}}</caption>
<thead><tr><th scope="col">Hour</th><th scope="col" class="bar">Sleep</th><th scope="col">Entries</th></tr></thead>
<tbody>
% for hour in summary['hours']:
<tr class="{{'future' if hour['start'] > now else 'past'}}">
  <th scope="row">{{clock(hour['start'])}}</th>
  <td class="bar"><svg viewBox="0 0 60 10" preserveAspectRatio="none" aria-hidden="true">
% for x, width in within(planned, hour['hour'] * 60, 60):
    <rect class="planned" x="{{x}}" y="0.5" width="{{width}}" height="9"/>
% end
% for x, width in hour['sleep']:
    <rect class="asleep" x="{{x}}" y="0" width="{{width}}" height="10"/>
% end
    <line class="tick" x1="15" x2="15" y1="0" y2="10"/><line class="tick" x1="30" x2="30" y1="0" y2="10"/><line class="tick" x1="45" x2="45" y1="0" y2="10"/>
  </svg></td>
  <td class="events">
% for entry in hour['events']:
    <a class="event" data-type="{{entry['type']}}" title="{{'note from the family' if entry['type'] == 'note' else entry['type']}}: history" href="/admin/families/{{family['id']}}/entries/{{entry['id']}}/history"><time>{{clock(entry['ts'])}}</time> {{entry['value']}}
% if entry['by']:
      <small>· {{entry['by']}}</small>
% end
    </a>
% end
  </td>
</tr>
% end
</tbody>
</table>
</section>
