%# Time zone picker: expects zone_options (the <option>s for a chosen zone), selected, id.
<select name="tz" id="{{id}}" required>{{!zone_options(selected)}}</select>
