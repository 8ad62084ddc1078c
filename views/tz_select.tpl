%# Time zone picker: expects zones (sorted names), selected, id.
<select name="tz" id="{{id}}" required>
% for zone in zones:
<option{{' selected' if zone == selected else ''}}>{{zone}}</option>
% end
</select>
