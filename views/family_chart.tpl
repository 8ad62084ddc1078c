%# The 14-day sleep chart (included by family.tpl): one SVG strip per day, 24 hours across.
<section id="chart" class="card">
<h2>Sleep, 14 days to {{date.day}} {{date.strftime('%b')}}</h2>
<p class="legend"><span class="key asleep"></span> asleep <span class="key feed"></span> feed
% if plan:
<span class="key planned"></span> planned
% end
</p>
<table class="chart">
<thead><tr><th scope="col"><span class="visually-hidden">Day</span></th><td class="hours"><span>00</span><span>03</span><span>06</span><span>09</span><span>12</span><span>15</span><span>18</span><span>21</span></td><th>Total</th></tr></thead>
<tbody>
% for day in chart:
<tr class="{{'chosen' if day['date'] == date else 'day'}}">
  <th scope="row"><a href="/admin/families/{{family['id']}}?date={{day['date']}}#day">{{day['date'].strftime('%a')}} {{day['date'].day}} <span class="month">{{day['date'].strftime('%b')}}</span></a></th>
  <td><svg viewBox="0 0 1440 10" preserveAspectRatio="none" role="img" aria-label="{{hm(day['minutes'])}} of sleep">
% for minute in range(60, 1440, 60):
    <line class="tick" x1="{{minute}}" x2="{{minute}}" y1="0" y2="10"/>
% end
% for minute in range(360, 1440, 360):
    <line class="tick major" x1="{{minute}}" x2="{{minute}}" y1="0" y2="10"/>
% end
% for x, width in planned:
    <rect class="planned" x="{{x}}" y="0.5" width="{{width}}" height="9"/>
% end
% for x, width in day['sleep']:
    <rect class="asleep" x="{{x}}" y="1" width="{{width}}" height="8"/>
% end
% for x in day['feeds']:
    <line class="feed" x1="{{x}}" x2="{{x}}" y1="0" y2="10"/>
% end
  </svg></td>
  <td class="total">{{hm(day['minutes'])}}</td>
</tr>
% end
</tbody>
</table>
</section>
