%# Family details, archive and the button editor (included by family.tpl): editor holds the rows
%# of the form (groups with their buttons), the JSON stays under Advanced.
<div class="columns">
<section id="details" class="card">
<h2>Details</h2>
% if 'details' in errors:
<p class="error" role="alert">{{errors['details']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/edit#details" class="stack">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Name <input name="name" value="{{form['name']}}" required maxlength="200"></label>
<label>Notes <textarea name="notes" rows="4" maxlength="10000">{{form['notes']}}</textarea></label>
<label for="family-tz">Time zone</label>
% include('tz_select.tpl', id='family-tz', selected=form['tz'])
<div class="pair">
<label>Night starts <input type="time" name="night_start" value="{{form['night_start']}}" required></label>
<label>Night ends <input type="time" name="night_end" value="{{form['night_end']}}" required></label>
</div>
<p class="hint">The Nights table and the dashboard's flags count each night between these two times.</p>
<button type="submit" class="primary">Save details</button>
</form>
% if family['archived']:
<form method="post" action="/admin/families/{{family['id']}}/edit#details" class="archive">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="archived" value="0">
  <p class="muted">This client is archived. Unarchiving lets their links work again.</p>
  <button type="submit">Unarchive client</button>
</form>
% else:
<form method="post" action="/admin/families/{{family['id']}}/edit#details" class="archive"
      data-confirm="Archive this client? Their links stop working and their devices are disconnected.">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="archived" value="1">
  <p class="muted">Archiving ends tracking: links stop working and devices are disconnected. Nothing is deleted.</p>
  <button type="submit" class="danger">Archive client</button>
</form>
% end
</section>

<section id="config" class="card">
<h2>Buttons</h2>
<p class="muted">What the family's app shows. Saving sends the new buttons to every open device at once.</p>
<div class="groups">
% for group in config:
  <div class="group"><h3>{{group['category']}}
% if group.get('stateful'):
    <small>state</small>
% end
  </h3>
% for button in group['buttons']:
    <span class="chip{{' counted' if button.get('counted') else ''}}">{{button['label']}}</span>
% end
  </div>
% end
</div>
% if 'buttons' in errors:
<p class="error" role="alert">{{errors['buttons']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/buttons#buttons" id="buttons" class="editor">
<input type="hidden" name="csrf" value="{{csrf}}">
<p class="hint">Rename by typing; tick Remove (or empty the name) to take a button or group away; the numbers set the order.
A <em>state</em> group's tap lasts until the next tap in that group, with a timer if ticked; <em>counted</em> states add up to minutes (sleep).</p>
% for g, group in enumerate(editor, 1):
<fieldset class="group-edit">
  <legend>{{group['category'] or 'New group'}}</legend>
  <div class="edit-row">
    <label class="grow">Group <input name="g{{g}}.category" value="{{group['category']}}" maxlength="64"></label>
    <label class="order">Order <input type="number" name="g{{g}}.order" value="{{group['order']}}"></label>
    <label class="check"><input type="checkbox" name="g{{g}}.stateful"{{' checked' if group['stateful'] else ''}}> State</label>
    <label class="check"><input type="checkbox" name="g{{g}}.remove"{{' checked' if group['remove'] else ''}}> Remove</label>
  </div>
% for b, button in enumerate(group['buttons'], 1):
  <div class="edit-row button-row">
    <label class="grow"><span class="{{'' if b == 1 else 'visually-hidden'}}">Button</span> <input name="g{{g}}.b{{b}}.label" value="{{button['label']}}" maxlength="64" placeholder="New button"></label>
    <label class="order"><span class="{{'' if b == 1 else 'visually-hidden'}}">Order</span> <input type="number" name="g{{g}}.b{{b}}.order" value="{{button['order']}}"></label>
    <label class="check"><input type="checkbox" name="g{{g}}.b{{b}}.timing"{{' checked' if button['timing'] else ''}}> Timer</label>
    <label class="check"><input type="checkbox" name="g{{g}}.b{{b}}.counted"{{' checked' if button['counted'] else ''}}> Counted</label>
    <label class="check"><input type="checkbox" name="g{{g}}.b{{b}}.remove"{{' checked' if button['remove'] else ''}}> Remove</label>
  </div>
% end
</fieldset>
% end
<button type="submit" class="primary">Save buttons</button>
</form>
<details class="advanced"{{' open' if 'config' in errors else ''}}>
<summary>Advanced: edit as JSON</summary>
% if 'config' in errors:
<p class="error" role="alert">{{errors['config']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/config#config" class="stack">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Button groups (JSON) <textarea name="config" rows="14" spellcheck="false" class="code">{{form['config']}}</textarea></label>
<p class="hint">A list of groups: <code>{"category": "sleep", "stateful": true, "buttons": [{"label": "sleeping", "counted": true}]}</code>.
A stateful group's entries set a state that lasts until the next one; <code>counted</code> states add up to minutes.</p>
<button type="submit" class="primary">Save JSON</button>
</form>
</details>
</section>
</div>
