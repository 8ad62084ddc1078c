"""Tests for the plan, coaching notes and the button editor without JSON (issue 11, items 3, 4 and 7).

The routes and forms through WebTest on the fixed clock of test_admin; plan and note messages to
devices against a real server over real sockets; the family page in Debian's Chromium at phone
and laptop widths.
"""

import datetime as dt
import os
import sqlite3
import time
import uuid
import zoneinfo

import pytest

from conftest import Device
from test_admin import (CHROMIUM_ARGS, HOSTILE, SHOTS, SYDNEY, add, assert_clean, at, browser, clock,  # noqa: F401
                        family_page, form_of, jane, page_html, post_form)

PLAN = {'wake': '07:00', 'naps': [{'start': '09:30', 'end': '11:00'}, {'start': '13:30', 'end': '15:00'}],
        'bedtime': '19:00'}


@pytest.fixture
def pushed(bt, monkeypatch):
    """What the hub was asked to broadcast, as (family id, message)."""
    sent = []
    monkeypatch.setattr(bt.hub, 'broadcast', lambda family_id, message: sent.append((family_id, message)))
    return sent


def csrf_of(web):
    return form_of(web.get('/admin'), '/admin/logout')['csrf'].value


# The plan: JSON --------------------------------------------------------------------------------

def test_plan_is_stored_shown_pushed_and_cleared(bt, logged_in, pushed):
    family = bt.create_family('Olivia')
    path = f"/admin/families/{family['id']}"
    assert logged_in.get(path, headers={'Accept': 'application/json'}).json['plan'] is None
    assert logged_in.put_json(path + '/plan', PLAN).json == PLAN
    assert logged_in.get(path, headers={'Accept': 'application/json'}).json['plan'] == PLAN
    assert logged_in.put_json(path + '/plan', {'plan': dict(PLAN, naps=[])}).json == dict(PLAN, naps=[])
    assert logged_in.put_json(path + '/plan', {'plan': None}).json == {'plan': None}
    assert logged_in.get(path, headers={'Accept': 'application/json'}).json['plan'] is None
    assert pushed == [(family['id'], {'type': 'plan', 'plan': PLAN}),
                      (family['id'], {'type': 'plan', 'plan': dict(PLAN, naps=[])}),
                      (family['id'], {'type': 'plan', 'plan': None})]


@pytest.mark.parametrize('body, message', [
    ({}, 'wake must be a time HH:MM such as 19:00'),
    (dict(PLAN, wake='7:00'), 'wake must be a time HH:MM such as 19:00'),
    (dict(PLAN, wake='24:00'), 'wake must be a time HH:MM such as 19:00'),
    (dict(PLAN, bedtime=1900), 'bedtime must be a time HH:MM such as 19:00'),
    (dict(PLAN, bedtime='19:00:00'), 'bedtime must be a time HH:MM such as 19:00'),
    (dict(PLAN, naps='09:30'), 'naps must be a list of at most 5 naps'),
    (dict(PLAN, naps=[{'start': '09:00', 'end': '09:30'}] * 6), 'naps must be a list of at most 5 naps'),
    (dict(PLAN, naps=[{'start': '11:00', 'end': '09:30'}]), 'nap 1 must start before it ends'),
    (dict(PLAN, naps=[{'start': '09:00', 'end': '09:30'}, {'start': '13:00', 'end': '13:00'}]),
     'nap 2 must start before it ends'),
    (dict(PLAN, naps=[{'start': '09:00'}]), 'nap 1 end must be a time HH:MM such as 19:00'),
    (dict(PLAN, naps=['09:00-10:00']), 'nap 1 must be {"start": "HH:MM", "end": "HH:MM"}'),
    (dict(PLAN, naps=[{'start': '09:00', 'end': '10:00', 'label': 'x'}]), 'nap 1 must be {"start"'),
    (dict(PLAN, colour='red'), 'unknown plan field: colour'),
    ({'plan': 'tomorrow'}, 'plan must be an object with wake, naps and bedtime, or null'),
])
def test_plan_mistakes_are_400_and_change_nothing(bt, logged_in, pushed, body, message):
    family = bt.create_family('Olivia')
    bt.save_plan(family['id'], PLAN)
    answer = logged_in.put_json(f"/admin/families/{family['id']}/plan", body, status=400)
    assert message in answer.json['error']
    assert bt.get_plan(family['id']) == PLAN and pushed == []


def test_plan_and_notes_routes_refuse_what_they_should(bt, logged_in, web):
    family = bt.create_family('Olivia')
    path = f"/admin/families/{family['id']}"
    logged_in.put_json('/admin/families/nosuchid/plan', PLAN, status=404)
    logged_in.post_json('/admin/families/nosuchid/notes', {'date': '2026-10-04', 'text': 'x'}, status=404)
    logged_in.get('/admin/families/nosuchid/notes', headers={'Accept': 'application/json'}, status=404)
    logged_in.put(path + '/plan', 'wake=07:00', status=415)
    logged_in.post(path + '/notes', {'date': '2026-10-04', 'text': 'x'}, status=415)
    web.reset()  # logged out
    assert web.put_json(path + '/plan', PLAN, status=401).json == {'error': 'Log in first.'}
    web.post_json(path + '/notes', {'date': '2026-10-04', 'text': 'x'}, status=401)
    assert bt.get_plan(family['id']) is None and bt.list_notes(family['id']) == []


# Coaching notes: JSON ----------------------------------------------------------------------------

def test_notes_are_written_listed_newest_first_and_deleted(bt, logged_in, pushed, clock):
    family = bt.create_family('Olivia')
    path = f"/admin/families/{family['id']}/notes"
    first = logged_in.post_json(path, {'date': '2026-10-03', 'text': 'Bedtime 15 min earlier.'}, status=201).json
    assert first == {'id': first['id'], 'date': '2026-10-03', 'text': 'Bedtime 15 min earlier.', 'created_at': clock[0]}
    clock[0] += 60_000
    second = logged_in.post_json(path, {'date': '2026-10-01', 'text': 'Well done!'}, status=201).json
    assert logged_in.get(path, headers={'Accept': 'application/json'}).json == {'notes': [second, first]}
    logged_in.delete(f"{path}/{first['id']}", status=204)
    logged_in.delete(f"{path}/{first['id']}", status=404)
    assert logged_in.get(path, headers={'Accept': 'application/json'}).json == {'notes': [second]}
    assert pushed == [(family['id'], {'type': 'note', 'note': first}), (family['id'], {'type': 'note', 'note': second}),
                      (family['id'], {'type': 'note', 'note': {'id': first['id'], 'deleted': True}})]


def test_another_familys_note_cannot_be_deleted(bt, logged_in, pushed):
    olivia, noah = bt.create_family('Olivia'), bt.create_family('Noah')
    note = bt.create_note(olivia['id'], '2026-10-04', 'Only for Olivia')
    answer = logged_in.delete(f"/admin/families/{noah['id']}/notes/{note['id']}", headers={'Accept': 'application/json'},
                              status=404)
    assert answer.json == {'error': 'No such note.'}
    csrf = csrf_of(logged_in)
    page = logged_in.post(f"/admin/families/{noah['id']}/notes/{note['id']}/delete", {'csrf': csrf}, status=400)
    assert 'That note was already deleted.' in page.html.find(id='notes').find(class_='error').get_text()
    assert bt.list_notes(olivia['id']) == [note] and pushed == []


@pytest.mark.parametrize('body, message', [
    ({'text': 'x'}, 'date must be a day such as 2026-01-31'),
    ({'date': '4 Oct', 'text': 'x'}, 'date must be a day such as 2026-01-31'),
    ({'date': '20261004', 'text': 'x'}, 'date must be a day such as 2026-01-31'),
    ({'date': '2026-02-30', 'text': 'x'}, 'date must be a day such as 2026-01-31'),
    ({'date': '0001-01-01', 'text': 'x'}, 'date must be a day such as 2026-01-31'),
    ({'date': '2026-10-04'}, 'text must be text'),
    ({'date': '2026-10-04', 'text': ''}, 'text must not be empty'),
    ({'date': '2026-10-04', 'text': ' \n '}, 'text must not be empty'),
    ({'date': '2026-10-04', 'text': 'x' * 4001}, 'text must be at most 4,000 characters'),
])
def test_note_mistakes_are_400_and_store_nothing(bt, logged_in, pushed, body, message):
    family = bt.create_family('Olivia')
    answer = logged_in.post_json(f"/admin/families/{family['id']}/notes", body, status=400)
    assert answer.json == {'error': message}
    assert bt.list_notes(family['id']) == [] and pushed == []


def test_a_note_of_4000_characters_is_kept_whole(bt, logged_in):
    family = bt.create_family('Olivia')
    text = 'é' * 3999 + '\n'
    logged_in.post_json(f"/admin/families/{family['id']}/notes", {'date': '2026-10-04', 'text': text}, status=201)
    assert bt.list_notes(family['id'])[0]['text'] == text


# The plan and notes on the family page -----------------------------------------------------------

def test_plan_form_saves_draws_pushes_and_clears(bt, jane, pushed):
    family = bt.create_family('Olivia', tz=SYDNEY)
    page = family_page(jane, family)
    assert not page.html.select('rect.planned') and 'No plan yet.' in page.html.find(id='plan').get_text()
    form = form_of(page, '/plan')
    form['wake'], form['bedtime'] = '07:00', '19:00'
    form['nap1_start'], form['nap1_end'] = '09:30', '11:00'
    form['nap3_start'], form['nap3_end'] = '13:30', '15:00'  # an empty row between is skipped
    assert form.submit(status=303).headers['Location'].endswith('#plan')
    assert bt.get_plan(family['id']) == PLAN and pushed == [(family['id'], {'type': 'plan', 'plan': PLAN})]
    page = family_page(jane, family)
    form = form_of(page, '/plan')
    assert [form[f].value for f in ('wake', 'nap1_start', 'nap1_end', 'nap2_start', 'nap2_end', 'bedtime')] == [
        '07:00', '09:30', '11:00', '13:30', '15:00', '19:00']
    # the day grid: hours 0-6 and 19-23 wholly planned sleep, 09:30-11:00 and 13:30-15:00 in part
    rows = {row.th.get_text(): [(float(r['x']), float(r['width'])) for r in row.select('rect.planned')]
            for row in page.html.select('table.grid tbody tr')}
    assert rows['06:00'] == rows['19:00'] == rows['23:00'] == [(0, 60)] and rows['07:00'] == rows['12:00'] == []
    assert rows['09:00'] == [(30, 30)] and rows['10:00'] == [(0, 60)] and rows['13:00'] == [(30, 30)]
    # the chart: every one of the 14 rows has the night (two parts) and the two naps, in wall-clock minutes
    for row in page.html.select('table.chart tbody tr'):
        assert [(float(r['x']), float(r['width'])) for r in row.select('rect.planned')] == [
            (0, 420), (1140, 300), (570, 90), (810, 90)]
    assert 'planned' in page.html.find(id='chart').find(class_='legend').get_text()
    form_of(page, '/plan').submit('clear', status=303)
    assert bt.get_plan(family['id']) is None and pushed[-1] == (family['id'], {'type': 'plan', 'plan': None})
    assert not family_page(jane, family).html.select('rect.planned')


def test_a_bedtime_after_midnight_is_drawn_from_bedtime_to_wake(bt, jane):
    family = bt.create_family('Olivia')
    bt.save_plan(family['id'], {'wake': '08:00', 'naps': [], 'bedtime': '00:30'})
    row = family_page(jane, family).html.select('table.chart tbody tr')[0]
    assert [(float(r['x']), float(r['width'])) for r in row.select('rect.planned')] == [(30, 450)]


@pytest.mark.parametrize('fields, message', [
    ({'wake': '', 'bedtime': '19:00'}, 'wake must be a time HH:MM such as 19:00'),
    ({'wake': '07:00', 'bedtime': '7pm'}, 'bedtime must be a time HH:MM such as 19:00'),
    ({'wake': '07:00', 'bedtime': '19:00', 'nap1_start': '11:00', 'nap1_end': '09:30'}, 'nap 1 must start before it ends'),
    ({'wake': '07:00', 'bedtime': '19:00', 'nap1_start': '09:30'}, 'nap 1 end must be a time'),
])
def test_plan_form_mistakes_keep_what_was_typed(bt, jane, pushed, fields, message):
    family = bt.create_family('Olivia')
    bt.save_plan(family['id'], PLAN)
    form = form_of(family_page(jane, family), '/plan')
    for name in ('nap1_start', 'nap1_end', 'nap2_start', 'nap2_end'):
        form[name] = ''
    for name, value in fields.items():
        form[name] = value
    page = form.submit(status=400)
    assert message in page.html.find(id='plan').find(class_='error').get_text()
    typed = form_of(page, '/plan')
    assert all(typed[name].value == value for name, value in fields.items())
    assert bt.get_plan(family['id']) == PLAN and pushed == []


def test_note_form_defaults_to_the_shown_day_and_notes_can_be_deleted(bt, jane, pushed, clock):
    family = bt.create_family('Olivia', tz=SYDNEY)
    form = form_of(family_page(jane, family, date='2026-10-01'), '/notes/new')
    assert form['date'].value == '2026-10-01'
    form['text'] = 'Try bedtime at 18:45.\nKeep the room dark.'
    assert form.submit(status=303).headers['Location'].endswith('#notes')
    note = bt.list_notes(family['id'])[0]
    assert note['date'] == '2026-10-01' and pushed == [(family['id'], {'type': 'note', 'note': note})]
    assert form_of(family_page(jane, family), '/notes/new')['date'].value == '2026-10-04'  # today in Sydney
    item = family_page(jane, family).html.select_one('#notes .note-list li')
    assert '2026-10-01' in item.get_text() and 'Try bedtime at 18:45.\nKeep the room dark.' in item.get_text()
    shown = family_page(jane, family, date='2026-10-01').html.select('#day .coach-note')
    assert [n.get_text() for n in shown] == ['Your note Try bedtime at 18:45.\nKeep the room dark.']
    assert not family_page(jane, family, date='2026-10-02').html.select('#day .coach-note')
    delete = form_of(family_page(jane, family), f"/notes/{note['id']}/delete")
    delete.submit(status=303)
    assert bt.list_notes(family['id']) == []
    assert pushed[-1] == (family['id'], {'type': 'note', 'note': {'id': note['id'], 'deleted': True}})
    assert 'That note was already deleted.' in delete.submit(status=400).text  # a second click, from the old page
    assert 'No notes yet.' in family_page(jane, family).html.find(id='notes').get_text()


@pytest.mark.parametrize('fields, message', [
    ({'date': '2026-10-02', 'text': '   '}, 'text must not be empty'),
    ({'date': '', 'text': 'Well done'}, 'date must be a day such as 2026-01-31'),
    ({'date': '2026-10-02', 'text': 'x' * 4001}, 'text must be at most 4,000 characters'),
])
def test_note_form_mistakes_keep_what_was_typed(bt, jane, pushed, fields, message):
    family = bt.create_family('Olivia')
    csrf = csrf_of(jane)
    page = jane.post(f"/admin/families/{family['id']}/notes/new", dict(fields, csrf=csrf), status=400)
    assert message in page.html.find(id='notes').find(class_='error').get_text()
    form = form_of(page, '/notes/new')
    assert form['date'].value == fields['date'] and form['text'].value == fields['text']
    assert bt.list_notes(family['id']) == [] and pushed == []


def test_parents_notes_show_on_the_day_grid_and_never_count(bt, jane, clock):
    family = bt.create_family('Olivia', tz=SYDNEY)
    for local, type, value in [('2026-10-04 08:00', 'feed', 'bottle'), ('2026-10-04 09:00', 'nappy', 'wet'),
                               ('2026-10-04 10:00', 'sleep', 'sleeping'), ('2026-10-04 11:00', 'sleep', 'awake')]:
        add(bt, family, at(local, SYDNEY), type, value)
    date = dt.date(2026, 10, 4)
    before = bt.day_summary(family, date)
    add(bt, family, at('2026-10-04 01:10', SYDNEY), 'note', 'Calpol 1 am', by='Dad')
    add(bt, family, at('2026-10-04 10:30', SYDNEY), 'note', 'teething', by='Mum')
    after = bt.day_summary(family, date)
    assert after['totals'] == before['totals'] == {'sleep_minutes': 60, 'feeds': 1, 'wet': 1, 'dirty': 0}
    # a note count is there, beside the other categories, which it leaves alone
    assert after['categories'] == dict(before['categories'], note={'count': 2})
    page = family_page(jane, family)
    notes = page.html.select('table.grid .event[data-type="note"]')
    assert [n.get_text(' ', strip=True) for n in notes] == ['01:10 Calpol 1 am · Dad', '10:30 teething · Mum']
    assert notes[0]['title'] == 'note from the family: history'
    assert 'note' not in [term.get_text() for term in page.html.select('#day .totals dt')]


# The button editor without JSON ------------------------------------------------------------------

def editor_form(web, family):
    return form_of(family_page(web, family), '/buttons')


def test_button_editor_shows_the_config_and_saves_it_unchanged(bt, jane, pushed):
    family = bt.create_family('Olivia')
    form = editor_form(jane, family)
    assert [form[f'g{g}.category'].value for g in (1, 2, 3, 4)] == ['sleep', 'feed', 'nappy', '']
    assert form['g1.stateful'].checked and not form['g2.stateful'].checked
    assert form['g1.b1.label'].value == 'sleeping' and form['g1.b1.counted'].checked and form['g1.b1.timing'].checked
    assert not form['g1.b2.counted'].checked and form['g1.b3.label'].value == ''  # an empty row to add a button
    assert form.submit(status=303).headers['Location'].endswith('#buttons')
    assert bt.get_config(family['id']) == bt.DEFAULT_CONFIG
    assert pushed == [(family['id'], {'type': 'config', 'data': bt.DEFAULT_CONFIG})]


def test_button_editor_adds_renames_removes_and_orders(bt, jane, pushed):
    family = bt.create_family('Olivia')
    form = editor_form(jane, family)
    form['g1.b2.label'] = 'awake again'             # rename
    form['g1.b3.label'], form['g1.b3.timing'] = 'drowsy', True  # add a button
    form['g1.b3.order'] = '0'                        # ... and put it first
    form['g2.b2.remove'] = True                      # remove a button
    form['g2.b3.label'] = ''                         # emptying a name removes it too
    form['g3.remove'] = True                         # remove a group
    form['g4.category'], form['g4.stateful'] = 'bath', True  # a new group
    form['g4.b1.label'], form['g4.b1.counted'] = 'in the bath', True
    form['g4.b2.label'] = 'out'
    form['g4.order'] = '1'                           # before feed (2), after sleep (1, typed earlier)
    form.submit(status=303)
    expected = [
        {'category': 'sleep', 'stateful': True, 'buttons': [
            {'label': 'drowsy', 'timing': True, 'counted': False},
            {'label': 'sleeping', 'timing': True, 'counted': True},
            {'label': 'awake again', 'timing': True, 'counted': False}]},
        {'category': 'bath', 'stateful': True, 'buttons': [
            {'label': 'in the bath', 'timing': False, 'counted': True}, {'label': 'out', 'timing': False, 'counted': False}]},
        {'category': 'feed', 'buttons': [{'label': 'breast left'}]},
    ]
    assert bt.get_config(family['id']) == expected
    assert pushed == [(family['id'], {'type': 'config', 'data': expected})]
    chips = [c.get_text() for c in family_page(jane, family).html.select('#config .chip')]
    assert chips == ['drowsy', 'sleeping', 'awake again', 'in the bath', 'out', 'breast left']


@pytest.mark.parametrize('fields, message', [
    ({'g2.category': 'sleep'}, 'category "sleep" appears twice'),
    ({'g2.category': ' '}, 'The group with the button "breast left" needs a name (or tick Remove).'),
    ({'g4.category': 'bath'}, 'The group "bath" needs at least one button (or tick Remove).'),
    ({'g1.order': 'first'}, 'The order of a group must be a whole number, not "first".'),
    ({'g2.b1.order': '1.5'}, 'The order of a button in "feed" must be a whole number, not "1.5".'),
    ({'g1.b1.label': 'x' * 65}, 'group 1 button 1 label must be at most 64 characters'),
    ({'g4.category': 'a', 'g4.stateful': 'on', 'g4.b1.label': 'x', 'g3.stateful': 'on', 'g2.stateful': 'on',
      'g5.category': 'b', 'g5.stateful': 'on', 'g5.b1.label': 'y'}, 'config may have at most 20 groups, 4 of them stateful'),
])
def test_button_editor_mistakes_keep_what_was_typed(bt, jane, pushed, fields, message):
    family = bt.create_family('Olivia')
    csrf = csrf_of(jane)
    typed = {k: v for k, v in editor_form(jane, family).submit_fields() if k != 'csrf'}
    typed.update(fields, csrf=csrf)
    page = jane.post(f"/admin/families/{family['id']}/buttons", typed, status=400)
    assert message in page.html.find(id='config').find(class_='error').get_text()
    form = form_of(page, '/buttons')
    for name, value in fields.items():
        assert (form[name].checked if value == 'on' else form[name].value) == (True if value == 'on' else value)
    assert bt.get_config(family['id']) == bt.DEFAULT_CONFIG and pushed == []


def test_the_json_editor_stays_under_advanced(bt, jane):
    family = bt.create_family('Olivia')
    details = family_page(jane, family).html.select_one('#config details.advanced')
    assert 'Advanced' in details.summary.get_text() and details.find('textarea', attrs={'name': 'config'})
    assert not details.has_attr('open')
    page = jane.post(f"/admin/families/{family['id']}/config", {'csrf': csrf_of(jane), 'config': '['}, status=400)
    assert page.html.select_one('#config details.advanced').has_attr('open')  # its mistake is shown, not hidden


# Forms: CSRF, sessions, unknown families, hostile strings ---------------------------------------

NEW_FORMS = ['/admin/families/{id}/plan', '/admin/families/{id}/notes/new', '/admin/families/{id}/notes/{note}/delete',
             '/admin/families/{id}/buttons']


@pytest.mark.parametrize('path', NEW_FORMS)
@pytest.mark.parametrize('csrf', [None, 'wrong'])
def test_every_new_form_needs_the_csrf_token(bt, jane, pushed, path, csrf):
    family = bt.create_family('Olivia')
    note = bt.create_note(family['id'], '2026-10-04', 'kept')
    fields = {'wake': '06:00', 'bedtime': '18:00', 'clear': '1', 'date': '2026-10-04', 'text': 'forged',
              'g1.category': 'forged', 'g1.b1.label': 'x', **({'csrf': csrf} if csrf else {})}
    page = jane.post(path.format(id=family['id'], note=note['id']), fields, status=403)
    assert 'This form has expired' in page.text
    assert bt.get_plan(family['id']) is None and bt.list_notes(family['id']) == [note]
    assert bt.get_config(family['id']) == bt.DEFAULT_CONFIG and pushed == []


@pytest.mark.parametrize('path', NEW_FORMS)
def test_new_forms_need_a_session_and_a_known_family(bt, web, jane, path):
    family = bt.create_family('Olivia')
    note = bt.create_note(family['id'], '2026-10-04', 'kept')
    csrf = csrf_of(jane)
    jane.post(path.format(id='nosuchid', note=note['id']), {'csrf': csrf, 'text': 'x'}, status=404)
    jane.reset()
    answer = jane.post(path.format(id=family['id'], note=note['id']), {'text': 'x', 'wake': '07:00'}, status=303)
    assert answer.headers['Location'].endswith('/admin') and bt.list_notes(family['id']) == [note]


@pytest.mark.parametrize('hostile', HOSTILE)
def test_hostile_strings_in_notes_plan_and_buttons_come_out_escaped(bt, jane, clock, hostile):
    escaped = hostile.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace('"', '&quot;')
    family = bt.create_family('Olivia', tz=SYDNEY)
    csrf, path = csrf_of(jane), f"/admin/families/{family['id']}"
    jane.post(path + '/notes/new', {'csrf': csrf, 'date': '2026-10-04', 'text': hostile}, status=303)
    add(bt, family, clock[0] - 3600_000, 'note', hostile, by=hostile)
    pages = [family_page(jane, family),
             jane.post(path + '/plan', {'csrf': csrf, 'wake': hostile, 'bedtime': hostile, 'nap1_start': hostile},
                       status=400),
             jane.post(path + '/notes/new', {'csrf': csrf, 'date': hostile, 'text': hostile}, status=400),
             jane.post(path + '/buttons', {'csrf': csrf, 'g1.category': hostile, 'g1.b1.label': hostile,
                                           'g2.category': hostile, 'g2.b1.label': 'x'}, status=400)]
    assert 'appears twice' in pages[3].text
    for page in pages:
        assert hostile not in page.text
        assert escaped in page.text
        assert not page.html.find('script', src=False) and not page.html.find('img')
        assert_clean(page.text)
    assert pages[0].text.count(escaped) >= 4  # the note in the list, on the day, the parents' note and its author


def test_new_templates_escape_everything():
    views = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'views')
    for name in ('family_plan.tpl', 'family_notes.tpl', 'family_settings.tpl', 'family_day.tpl', 'family_chart.tpl'):
        with open(os.path.join(views, name)) as template:
            assert '{{!' not in template.read(), name


# Against a real server -------------------------------------------------------------------------

def test_devices_get_the_plan_and_notes_at_init_and_live(server, admin):
    family = admin.create_family('Olivia')
    link = admin.create_link(family['id'], 'Mum')
    phone = Device(server, family['id'], link['token'])
    assert phone.init['plan'] is None and phone.init['notes'] == []
    admin.ok('PUT', f"/admin/families/{family['id']}/plan", PLAN)
    assert phone.recv_until(lambda m: m['type'] == 'plan') == {'type': 'plan', 'plan': PLAN}
    note = admin.ok('POST', f"/admin/families/{family['id']}/notes", {'date': '2026-10-04', 'text': 'Well done!'})
    assert phone.recv_until(lambda m: m['type'] == 'note') == {'type': 'note', 'note': note}
    later = admin.ok('POST', f"/admin/families/{family['id']}/notes", {'date': '2026-10-05', 'text': 'Keep going'})
    phone.recv_until(lambda m: m['type'] == 'note')
    with sqlite3.connect(server.db_path) as db:  # a note written 61 days ago stays off the phone's first load
        db.execute('INSERT INTO notes (id, family_id, date, text, created_at) VALUES (?, ?, ?, ?, ?)',
                   ('old', family['id'], '2026-08-01', 'old', int(time.time() * 1000) - 61 * 86400_000))
    tablet = Device(server, family['id'], link['token'], since=phone.cursor)
    newest_first = sorted([later, note], key=lambda n: (n['created_at'], n['id']), reverse=True)
    assert tablet.init['plan'] == PLAN and tablet.init['notes'] == newest_first
    admin.ok('DELETE', f"/admin/families/{family['id']}/notes/{note['id']}")
    for device in (phone, tablet):
        assert device.recv_until(lambda m: m['type'] == 'note') == {'type': 'note', 'note': {'id': note['id'], 'deleted': True}}
    admin.ok('PUT', f"/admin/families/{family['id']}/plan", {'plan': None})
    for device in (phone, tablet):
        assert device.recv_until(lambda m: m['type'] == 'plan') == {'type': 'plan', 'plan': None}
    other = admin.create_family('Noah')
    admin.ok('POST', f"/admin/families/{other['id']}/notes", {'date': '2026-10-04', 'text': 'for Noah'})
    phone.expect_silence()  # another family's note never reaches this one
    assert Device(server, family['id'], link['token']).init['notes'] == [later]


def test_page_forms_reach_live_devices(server, admin):
    family = admin.create_family('Olivia')
    link = admin.create_link(family['id'], 'Mum')
    phone = Device(server, family['id'], link['token'])
    path = f"/admin/families/{family['id']}"
    post_form(admin, path + '/plan', {'wake': '06:30', 'bedtime': '18:30', 'nap1_start': '10:00', 'nap1_end': '11:00'})
    assert phone.recv_until(lambda m: m['type'] == 'plan')['plan'] == {
        'wake': '06:30', 'naps': [{'start': '10:00', 'end': '11:00'}], 'bedtime': '18:30'}
    post_form(admin, path + '/notes/new', {'date': '2026-10-04', 'text': 'Lovely night'})
    note = phone.recv_until(lambda m: m['type'] == 'note')['note']
    assert note['text'] == 'Lovely night' and note['date'] == '2026-10-04'
    post_form(admin, path + f"/notes/{note['id']}/delete", {})
    assert phone.recv_until(lambda m: m['type'] == 'note')['note'] == {'id': note['id'], 'deleted': True}
    post_form(admin, path + '/buttons', {'g1.category': 'feed', 'g1.b1.label': 'bottle', 'g1.b2.label': 'solids'})
    assert phone.recv_until(lambda m: m['type'] == 'config')['data'] == [
        {'category': 'feed', 'buttons': [{'label': 'bottle'}, {'label': 'solids'}]}]
    assert 'Lovely night' not in page_html(admin, path)


# In a real browser ------------------------------------------------------------------------------

@pytest.mark.parametrize('width', [390, 1280])
def test_plan_notes_and_button_editor_in_chromium(server, admin, browser, width):
    os.makedirs(SHOTS, exist_ok=True)
    family = admin.create_family('Olivia Bennett', tz=SYDNEY)
    link = admin.create_link(family['id'], 'Mum')
    phone = Device(server, family['id'], link['token'])
    now = int(time.time() * 1000)
    for minutes, type, value in [(600, 'sleep', 'sleeping'), (200, 'sleep', 'awake'), (150, 'note', 'teething, Calpol at 2'),
                                 (120, 'feed', 'bottle'), (60, 'sleep', 'sleeping')]:
        entry_id = uuid.uuid4().hex
        phone.add(entry_id, now - minutes * 60_000, type, value)
        phone.entry_echo(entry_id)
    context = browser.new_context(viewport={'width': width, 'height': 900})
    context.add_cookies([{'name': c.name, 'value': c.value, 'url': server.base_url} for c in admin.jar])
    page = context.new_page()
    problems = []
    page.on('console', lambda message: problems.append(message.text) if message.type in ('error', 'warning') else None)
    page.on('pageerror', lambda error: problems.append(str(error)))
    page.goto(f"{server.base_url}/admin/families/{family['id']}")

    page.fill('#plan input[name=wake]', '07:00')
    page.fill('#plan input[name=nap1_start]', '09:30')
    page.fill('#plan input[name=nap1_end]', '11:00')
    page.fill('#plan input[name=nap2_start]', '13:30')
    page.fill('#plan input[name=nap2_end]', '15:00')
    page.fill('#plan input[name=bedtime]', '19:00')
    page.click('#plan button:has-text("Save plan")')
    page.wait_for_selector('#plan button:has-text("Clear plan")')
    assert phone.recv_until(lambda m: m['type'] == 'plan')['plan'] == PLAN
    assert page.locator('table.chart rect.planned').count() == 14 * 4

    page.fill('#notes textarea[name=text]', 'Great progress. Try bedtime at 18:45 tonight.')
    page.click('#notes button:has-text("Send note")')
    page.wait_for_selector('#notes .note-list li')
    assert phone.recv_until(lambda m: m['type'] == 'note')['note']['text'] == 'Great progress. Try bedtime at 18:45 tonight.'

    page.fill('#buttons input[name="g2.b4.label"]', 'solids')
    page.fill('#buttons input[name="g4.category"]', 'bath')
    page.fill('#buttons input[name="g4.b1.label"]', 'bath time')
    page.click('#buttons button:has-text("Save buttons")')
    page.wait_for_selector('#config .chip:has-text("bath time")')
    assert [g['category'] for g in phone.recv_until(lambda m: m['type'] == 'config')['data']] == ['sleep', 'feed', 'nappy', 'bath']

    page.fill('#buttons input[name="g4.category"]', 'sleep')  # a mistake: shown, and what was typed is still there
    page.fill('#buttons input[name="g4.b1.label"]', 'bath again')
    page.click('#buttons button:has-text("Save buttons")')
    page.wait_for_selector('#config .error')
    assert 'category "sleep" appears twice' in page.inner_text('#config .error')
    assert page.input_value('#buttons input[name="g4.b1.label"]') == 'bath again'
    assert page.is_hidden('#config textarea[name=config]')  # the JSON waits under Advanced
    page.click('#config summary:has-text("Advanced")')
    assert page.is_visible('#config textarea[name=config]')

    # the note's own day: shortly after midnight in Sydney it was yesterday there
    noted = dt.datetime.fromtimestamp(now / 1000 - 150 * 60, zoneinfo.ZoneInfo(SYDNEY)).date()
    page.goto(f"{server.base_url}/admin/families/{family['id']}?date={noted}")
    assert page.locator('table.grid .event[data-type="note"]').count() == 1
    assert page.evaluate('getComputedStyle(document.querySelector(".event[data-type=note]")).fontStyle') == 'italic'
    assert page.evaluate('document.documentElement.scrollWidth') <= width, 'the family page is wider than the window'
    page.screenshot(path=f'{SHOTS}/program-family-{width}.png', full_page=True)
    for part in ('day', 'chart', 'plan', 'notes'):
        page.locator(f'#{part}').screenshot(path=f'{SHOTS}/program-{part}-{width}.png')
    page.locator('#config').screenshot(path=f'{SHOTS}/program-buttons-{width}.png')
    phone.close()
    context.close()
    assert problems == ['Failed to load resource: the server responded with a status of 400 (Bad Request)']
