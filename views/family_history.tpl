%# One entry's history: expects family, entry_id, changes (a page of versions, oldest first), current (the current
%# version's seq), older (the `before` of the page of older versions, or None), when (ms -> text), csrf.
%# Only the three known types become a class name (t-sleep, t-feed, t-nappy): a type is free text.
% rebase('base.tpl', title='History · ' + family['name'])
<main>
<div class="heading">
  <div>
    <p class="crumbs"><a href="/admin/families/{{family['id']}}">{{family['name']}}</a></p>
    <h1>History of an entry</h1>
    <p class="muted">Every version, oldest first. Times in {{family['tz']}}.</p>
  </div>
  <p class="actions"><a href="/admin/families/{{family['id']}}/deleted">Recently deleted</a></p>
</div>
% if older:
<p class="actions"><a href="?before={{older}}" rel="prev">← Older versions</a></p>
% end
<ol class="versions">
% for change in changes:
<li class="card{{' deleted' if change['deleted'] else ''}}">
  <p class="version-head"><span class="event" data-type="{{change['type']}}">{{change['type']}}: {{change['value']}}</span>
    <span class="muted">at {{when(change['ts'])}}</span>
% if change['deleted']:
    <span class="badge">deleted</span>
% end
% if change['seq'] == current:
    <span class="badge online">current</span>
% end
  </p>
  <p class="meta">By {{change['by'] or 'unknown'}}, {{when(change['at'])}}</p>
% if change['seq'] != current and not change['deleted']:  # "restoring" a deletion would delete it again
  <form method="post" action="/admin/families/{{family['id']}}/entries/{{entry_id}}/restore" class="inline">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <input type="hidden" name="seq" value="{{change['seq']}}">
    <button type="submit">Restore this version</button>
  </form>
% end
</li>
% end
</ol>
</main>
