%# An import's preview (held: the key of the waiting file) or its result (found['added']): expects family,
%# found {entries, skipped {name: n}, from, to, added?}, skipped ('12 Solids, 3 Pump'), held, day (ms -> '3 Nov 2026'), csrf.
% rebase('base.tpl', title='Import · ' + family['name'])
<main class="narrow">
<section class="card" id="import-preview">
<p class="crumbs"><a href="/admin/families/{{family['id']}}">{{family['name']}}</a></p>
<h1>{{'Imported' if 'added' in found else 'Import this file?'}}</h1>
% if found['entries']:
<p class="lead">{{'{:,}'.format(found['entries'])}} {{'entry' if found['entries'] == 1 else 'entries'}} from {{day(found['from'])}} to {{day(found['to'])}}</p>
% else:
<p class="lead">No entries to import.</p>
% end
% if found['skipped']:
<p>Skipped: {{skipped}}</p>
% end
% if 'added' in found:
<p>{{'{:,}'.format(found['added'])}} new; {{'{:,}'.format(found['entries'] - found['added'])}} {{'was' if found['entries'] - found['added'] == 1 else 'were'}} already here.</p>
<p><a href="/admin/families/{{family['id']}}">Back to {{family['name']}}</a></p>
% else:
<div class="actions">
  <form method="post" action="/admin/families/{{family['id']}}/import" class="inline">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <input type="hidden" name="held" value="{{held}}">
    <button type="submit" class="primary"{{'' if found['entries'] else ' disabled'}}>Import</button>
  </form>
  <a href="/admin/families/{{family['id']}}#import">Cancel</a>
</div>
<p class="meta">Huckleberry times were read in {{family['tz']}}. The file waits here for 30 minutes.</p>
% end
</section>
</main>
