/**
 * The extension's pure logic: formatting durations and money, reducing the server's
 * progress events to what a start is doing now, reading fixes out of error messages,
 * and when a per-kernel limit deserves a warning. No JupyterLab imports, so node's own
 * test runner checks it.
 */

/** One progress event of a kernel, as the server emits and `/api/compute/progress` lists. */
export interface IPhase {
  phase: string;
  elapsed_seconds: number;
  instance_id?: string | null;
  cost_usd?: number;
  message?: string;
  path?: string;
}

/** The phases of a start that has not ended yet. */
export const START_PHASES = [
  'requesting',
  'queued',
  'booting',
  'connecting',
  'uploading files',
  'starting kernel'
];

const PHASE_LABELS: Record<string, string> = {
  requesting: 'Requesting a GPU',
  queued: 'Queued for capacity',
  booting: 'Booting the instance',
  connecting: 'Connecting',
  'uploading files': 'Uploading files',
  'starting kernel': 'Starting the kernel',
  ready: 'Ready',
  failed: 'Start failed',
  'limit reached': 'Limit reached',
  'shut down': 'Shut down'
};

/** What a person reads for a phase name: "booting" → "Booting the instance". */
export function phaseLabel(phase: string): string {
  return PHASE_LABELS[phase] ?? phase;
}

/** Seconds as h:mm:ss (hours unbounded), as the server's log writes them: 754 → "0:12:34". */
export function formatDuration(seconds: number): string {
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  return `${h}:${String(m).padStart(2, '0')}:${String(s).padStart(2, '0')}`;
}

/** US dollars with cents, or four decimals below a cent so a fresh instance is not "$0.00". */
export function formatCost(usd: number): string {
  const value = Math.max(0, usd);
  return `$${value.toFixed(value > 0 && value < 0.01 ? 4 : 2)}`;
}

/** An hourly price: 1.89 → "$1.89/h". */
export function formatPrice(perHour: number): string {
  return `${formatCost(perHour)}/h`;
}

/** The cost of `uptimeSeconds` at `pricePerHour`. */
export function costOf(pricePerHour: number, uptimeSeconds: number): number {
  return (pricePerHour * Math.max(0, uptimeSeconds)) / 3600;
}

/** Where a kernel's start stands, reduced from its events. */
export interface IStartState {
  /** The latest phase. */
  phase: string;
  /** Seconds since the start began, as of the latest event. */
  elapsed: number;
  /** The instance, once the platform has answered the request. */
  instanceId: string | null;
  /** Whether the start is still under way (its latest phase is a start phase). */
  active: boolean;
  /** The error of a failed start. */
  error: string | null;
  /** The notebook the start is for. */
  path: string | null;
}

/**
 * Reduce a kernel's events, oldest first, to its start's state; null before any event.
 * Facts an event leaves out (instance, notebook) are kept from earlier ones, and a failed
 * start stays failed through the "shut down" that follows it.
 */
export function reducePhases(events: readonly IPhase[]): IStartState | null {
  return events.reduce<IStartState | null>((previous, event) => {
    const failedBefore = event.phase === 'shut down' && previous?.phase === 'failed';
    return {
      phase: event.phase,
      // "shut down" counts the instance's time, not the start's.
      elapsed: failedBefore ? previous.elapsed : event.elapsed_seconds,
      instanceId: event.instance_id ?? previous?.instanceId ?? null,
      active: START_PHASES.includes(event.phase),
      error:
        event.phase === 'failed'
          ? (event.message ?? 'the start failed')
          : event.phase === 'shut down'
            ? (previous?.error ?? null)
            : null,
      path: event.path ?? previous?.path ?? null
    };
  }, null);
}

/** The notebook a kernel was started for, from its phases. */
export function notebookOf(phases: readonly IPhase[]): string | null {
  return phases.find(phase => phase.path)?.path ?? null;
}

/** A start failure told fix first: what to do, then the whole message. */
export interface IFailure {
  fix: string;
  message: string;
}

const FREE_NOW = 'GPU types free right now: ';

/**
 * The fix a start error carries. This project's errors read "what happened; what to do",
 * so the last clause is the fix; a no-capacity error lists the types that are free, of
 * which only those with a kernelspec here (`installed`, lower case, when known) can be
 * chosen.
 */
export function failureOf(message: string, installed?: ReadonlySet<string>): IFailure {
  const text = message.trim();
  const clauses = text.split('; ');
  const last = clauses.length > 1 ? clauses[clauses.length - 1] : '';
  let fix: string;
  if (last.startsWith(FREE_NOW)) {
    fix = freeFix(last.slice(FREE_NOW.length), installed);
  } else if (last) {
    fix = capitalize(last.replace(/\.$/, '')) + '.';
  } else {
    fix = 'See the Jupyter server log for details.';
  }
  return { fix, message: text };
}

function freeFix(list: string, installed?: ReadonlySet<string>): string {
  const free = list
    .split(',')
    .map(name => name.trim())
    .filter(name => name && name !== 'none');
  const choosable = installed ? free.filter(name => installed.has(name.toLowerCase())) : free;
  if (choosable.length) {
    const verb = choosable.length > 1 ? 'are' : 'is';
    return `Choose another GPU type: ${choosable.join(', ')} ${verb} free now.`;
  }
  if (free.length) {
    return `Install a free GPU type: jupyter flexai install --gpu ${free[0]}.`;
  }
  return 'No GPU type is free right now: try again in a few minutes.';
}

function capitalize(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/**
 * The limit a "limit reached" message names ("max_cost of $25"), or null: the server's
 * message is longer than a notification shows.
 */
export function limitIn(message: string): string | null {
  const found = /(max_cost of \$[\d.]+|max_hours of [\d.]+ h)/.exec(message);
  return found ? found[1] : null;
}

/** A running instance's limits and what it has used, as `/api/compute/instances` gives. */
export interface ILimitInput {
  price_per_hour: number | null;
  uptime_seconds: number | null;
  limits: { max_hours: number | null; max_cost: number | null };
}

/** A limit that will shut the kernel down soon. */
export interface ILimitWarning {
  /** Seconds left before the limit acts (0 once it is reached). */
  remaining: number;
  text: string;
}

/**
 * The nearer of the kernel's limits, if it will act within 10 % of its span or 5 minutes,
 * whichever is longer; null otherwise.
 */
export function limitWarning(
  model: ILimitInput,
  uptimeSeconds = model.uptime_seconds ?? 0,
  kernel = 'The kernel'
): ILimitWarning | null {
  const { max_hours: maxHours, max_cost: maxCost } = model.limits;
  const price = model.price_per_hour ?? 0;
  const candidates: { span: number; remaining: number; what: string }[] = [];
  if (maxHours) {
    const span = maxHours * 3600;
    candidates.push({
      span,
      remaining: span - uptimeSeconds,
      what: `its max_hours of ${maxHours} h`
    });
  }
  if (maxCost && price > 0) {
    const span = (maxCost / price) * 3600;
    candidates.push({
      span,
      remaining: span - uptimeSeconds,
      what: `its max_cost of ${formatCost(maxCost)}`
    });
  }
  if (!candidates.length) {
    return null;
  }
  const nearest = candidates.reduce((a, b) => (b.remaining < a.remaining ? b : a));
  if (nearest.remaining > Math.max(300, nearest.span / 10)) {
    return null;
  }
  const remaining = Math.max(0, nearest.remaining);
  const when =
    remaining > 0 ? `in ${formatDuration(remaining)}` : 'now';
  return {
    remaining,
    text: `${kernel} will be shut down and its instance deleted ${when}: it reaches ${nearest.what}.`
  };
}
