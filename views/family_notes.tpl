%# Coaching notes (included by family.tpl): the new-note form (form['date'] defaults to the shown
%# day, form['text']) and every note, newest first, each with its date and a Delete button.
<section id="notes" class="card">
<h2>Coaching notes</h2>
% if 'notes' in errors:
<p class="error" role="alert">{{errors['notes']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/notes/new#notes" class="stack">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>For the day <input type="date" name="date" value="{{form['date']}}" required></label>
<label>Note <textarea name="text" rows="4" maxlength="4000" required>{{form['text']}}</textarea></label>
<button type="submit" class="primary">Send note</button>
</form>
% if notes:
<ul class="note-list">
% for note in notes:
  <li>
    <p class="meta"><a href="/admin/families/{{family['id']}}?date={{note['date']}}#day">{{note['date']}}</a> · written {{when(note['created_at'])}}</p>
    <p class="note-text">{{note['text']}}</p>
    <form method="post" action="/admin/families/{{family['id']}}/notes/{{note['id']}}/delete#notes" class="inline"
          data-confirm="Delete this note? It disappears from the family's app too.">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit" class="link danger">Delete</button>
    </form>
  </li>
% end
</ul>
% else:
<p class="muted">No notes yet. A note reaches the family's app at once.</p>
% end
</section>
