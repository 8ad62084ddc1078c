%# Access links (included by family.tpl): each with its URL, expiry, presence and Revoke; the new-link form.
<section id="links" class="card">
<h2>Access links</h2>
% if 'links' in errors:
<p class="error" role="alert">{{errors['links']}}</p>
% end
% if not links:
<p class="muted">No working links. Create one and send it to the family.</p>
% end
<ul class="links">
% for link in links:
<li>
  <div class="link-head">
    <strong>{{link['label'] or 'Unlabelled link'}}</strong>
% if link['token'] in online:
    <span class="badge online">online now</span>
% end
% if link['expires_at'] and link['expires_at'] <= now:
    <span class="badge warn">expired</span>
% end
  </div>
  <div class="url">
    <input id="url-{{link['token']}}" value="{{link['url']}}" readonly aria-label="Address of this link">
    <button type="button" data-copy="url-{{link['token']}}" hidden>Copy</button>
  </div>
  <p class="meta">Created {{when(link['created_at'])}} ·
% if link['expires_at']:
    expires {{when(link['expires_at'])}}
% else:
    never expires
% end
  </p>
  <form method="post" action="/admin/families/{{family['id']}}/links/{{link['token']}}/revoke#links" class="inline"
        data-confirm="Revoke this link? Devices using it are disconnected at once.">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <button type="submit" class="danger">Revoke</button>
  </form>
</li>
% end
</ul>
<form method="post" action="/admin/families/{{family['id']}}/links/new#links" class="stack new-link">
<h3>New link</h3>
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Label <input name="label" value="{{form['label']}}" maxlength="100" placeholder="e.g. Mum’s phone"></label>
<label>Expires <select name="expires" data-reveal="expires-on">
% for value, text in (('never', 'Never'), ('7', 'In 1 week'), ('14', 'In 2 weeks'), ('date', 'After a chosen day')):
  <option value="{{value}}"{{' selected' if form['expires'] == value else ''}}>{{text}}</option>
% end
</select></label>
<label id="expires-on">Last day it works <input type="date" name="expires_on" value="{{form['expires_on']}}"></label>
<button type="submit" class="primary">Create link</button>
</form>
</section>
