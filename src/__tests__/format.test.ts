import assert from 'node:assert/strict';

import {
  costOf,
  failureOf,
  formatCost,
  formatDuration,
  formatPrice,
  limitIn,
  limitWarning,
  notebookOf,
  phaseLabel,
  reducePhases
} from '../format';

test('durations read as h:mm:ss', () => {
  assert.equal(formatDuration(0), '0:00:00');
  assert.equal(formatDuration(754.4), '0:12:34');
  assert.equal(formatDuration(3600 * 27 + 61), '27:01:01');
  assert.equal(formatDuration(-5), '0:00:00');
});

test('costs keep cents, and four decimals below a cent', () => {
  assert.equal(formatCost(0.395955), '$0.40');
  assert.equal(formatCost(12), '$12.00');
  assert.equal(formatCost(0.00421), '$0.0042');
  assert.equal(formatCost(0), '$0.00');
  assert.equal(formatPrice(1.89), '$1.89/h');
  assert.ok(Math.abs(costOf(1.89, 754) - 0.39585) < 1e-6);
  assert.equal(costOf(1.89, -1), 0);
});

test('events reduce to the current phase of the start', () => {
  assert.equal(reducePhases([]), null);
  const booting = reducePhases([
    { phase: 'requesting', elapsed_seconds: 0, path: 'a.ipynb' },
    { phase: 'booting', elapsed_seconds: 1.5, instance_id: 'inst-1' }
  ]);
  assert.deepEqual(booting, {
    phase: 'booting',
    elapsed: 1.5,
    instanceId: 'inst-1',
    active: true,
    error: null,
    path: 'a.ipynb'
  });
  assert.equal(phaseLabel(booting!.phase), 'Booting the instance');
  assert.equal(notebookOf([{ phase: 'requesting', elapsed_seconds: 0, path: 'a.ipynb' }]), 'a.ipynb');
  assert.equal(notebookOf([{ phase: 'ready', elapsed_seconds: 1 }]), null);
  const ready = reducePhases([
    { phase: 'requesting', elapsed_seconds: 0 },
    { phase: 'ready', elapsed_seconds: 20, instance_id: 'inst-1' }
  ]);
  assert.equal(ready!.active, false);
  assert.equal(ready!.error, null);
});

test('a failed start stays failed through its shutdown', () => {
  const state = reducePhases([
    { phase: 'requesting', elapsed_seconds: 0 },
    { phase: 'failed', elapsed_seconds: 0.4, message: 'no capacity' },
    { phase: 'shut down', elapsed_seconds: 0, cost_usd: 0 }
  ]);
  assert.equal(state!.phase, 'shut down');
  assert.equal(state!.error, 'no capacity');
  assert.equal(state!.elapsed, 0.4);
  assert.equal(state!.active, false);
});

test('start failures are told fix first', () => {
  const full = failureOf(
    'no free A100 capacity (0 of 0 free); GPU types free right now: H100, L4'
  );
  assert.equal(full.fix, 'Choose another GPU type: H100, L4 are free now.');
  const message = full.message;
  assert.equal(
    failureOf(message, new Set(['a100', 'l4'])).fix,
    'Choose another GPU type: L4 is free now.'
  );
  assert.equal(
    failureOf(message, new Set(['a100'])).fix,
    'Install a free GPU type: jupyter flexai install --gpu H100.'
  );
  assert.match(full.message, /^no free A100 capacity/);
  assert.equal(
    failureOf('x; GPU types free right now: none').fix,
    'No GPU type is free right now: try again in a few minutes.'
  );
  assert.equal(
    failureOf('the FlexAI API at http://x rejected the API key (bad); check FLEXAI_API_KEY')
      .fix,
    'Check FLEXAI_API_KEY.'
  );
  assert.equal(failureOf('boom').fix, 'See the Jupyter server log for details.');
});

test('limits warn shortly before they act', () => {
  const model = {
    price_per_hour: 2,
    uptime_seconds: 0,
    limits: { max_hours: 8, max_cost: null }
  };
  assert.equal(limitWarning(model, 3600), null);
  const soon = limitWarning(model, 8 * 3600 - 600)!;
  assert.equal(soon.remaining, 600);
  assert.match(soon.text, /in 0:10:00: it reaches its max_hours of 8 h/);
  const cost = { ...model, limits: { max_hours: 8, max_cost: 1 } }; // $1 at $2/h: 30 min
  assert.match(limitWarning(cost, 1700)!.text, /max_cost of \$1\.00/);
  assert.match(limitWarning(cost, 1900)!.text, /deleted now/);
  assert.match(limitWarning(cost, 1900, 'The FlexAI kernel for a.ipynb')!.text, /^The FlexAI kernel for a\.ipynb will/);
  assert.equal(
    limitWarning({ ...model, limits: { max_hours: null, max_cost: null } }, 1e9),
    null
  );
});

test('a limit reached is named from the message of the server', () => {
  assert.equal(
    limitIn(
      "instance inst-1 has cost $25.0012 at $1.89/h, reaching the kernel's max_cost of $25"
    ),
    'max_cost of $25'
  );
  assert.equal(
    limitIn("instance inst-1 has run 8.0001 h, reaching the kernel's max_hours of 8 h"),
    'max_hours of 8 h'
  );
  assert.equal(limitIn('something else'), null);
});
