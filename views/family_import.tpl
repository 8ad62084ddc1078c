%# Import (included by family.tpl): a file from babytrackd or Huckleberry, previewed before anything is stored.
<section id="import" class="card">
<h2>Import</h2>
<p class="muted">A CSV or JSON export from babytrackd, or Huckleberry's CSV export (times in {{family['tz']}}), up to 5 MiB.
You see what it holds before anything is stored; importing the same file twice adds nothing.</p>
% if 'import' in errors:
<p class="error" role="alert">{{errors['import']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/import" enctype="multipart/form-data" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="preview" value="1">
  <label>File <input type="file" name="file" accept=".csv,.json,text/csv,application/json" required></label>
  <button type="submit" class="primary">Preview</button>
</form>
</section>
