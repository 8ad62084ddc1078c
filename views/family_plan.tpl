%# The plan form (included by family.tpl): wake time, up to five naps and bedtime; form holds wake,
%# bedtime and nap1_start ... nap5_end (what is stored, or what was typed when refused).
<section id="plan" class="card">
<h2>Plan</h2>
<p class="muted">Drawn as an outline on the day and the chart, and sent to the family's app at once.
% if not plan:
No plan yet.
% end
</p>
% if 'plan' in errors:
<p class="error" role="alert">{{errors['plan']}}</p>
% end
<form method="post" action="/admin/families/{{family['id']}}/plan#plan" class="plan-form">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Wake up <input type="time" name="wake" value="{{form['wake']}}"></label>
<fieldset>
  <legend>Naps <small class="muted">(leave a row empty for fewer)</small></legend>
% for n in range(1, 6):
  <div class="nap">
    <label>Nap {{n}} from <input type="time" name="nap{{n}}_start" value="{{form['nap%d_start' % n]}}"></label>
    <label>to <input type="time" name="nap{{n}}_end" value="{{form['nap%d_end' % n]}}"></label>
  </div>
% end
</fieldset>
<label>Bedtime <input type="time" name="bedtime" value="{{form['bedtime']}}"></label>
<p class="buttons">
  <button type="submit" class="primary">Save plan</button>
% if plan:
  <button type="submit" name="clear" value="1">Clear plan</button>
% end
</p>
</form>
</section>
