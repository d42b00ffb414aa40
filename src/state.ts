/**
 * What this page knows about the server's FlexAI kernels: the starts under way (from the
 * progress events, or polling `/api/compute/progress` when no event arrives), and the
 * running instances (re-synced from `/api/compute/instances`).
 */
import type { Event } from '@jupyterlab/services';
import type { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import {
  compute,
  type IGPUType,
  type IInstance,
  type IParked,
  type IProgress,
  type IStopped,
  SCHEMA_ID
} from './api';
import { type IPhase, type IStartState, reducePhases } from './format';

/** Seconds between re-syncs of the instances while any is known, and otherwise. */
const SYNC_BUSY = 10;
const SYNC_IDLE = 30;
/** Seconds without an event after which an active start is polled. */
const POLL_AFTER = 3;

/** A start, as of the latest of its events this page has seen. */
export interface IStart extends IStartState {
  kernelId: string;
  /** When the latest event arrived (ms since the epoch): elapsed time runs on from it. */
  receivedAt: number;
}

/** A running instance, as of its latest sync. */
export interface ISynced {
  model: IInstance;
  syncedAt: number;
}

/** A parked instance, as of its latest sync. */
export interface ISyncedParked {
  model: IParked;
  syncedAt: number;
}

/** Seconds a start has taken so far, counted on from its latest event. */
export function elapsedOf(start: IStart, now: number): number {
  return Math.round(start.elapsed + (now - start.receivedAt) / 1000);
}

/** Seconds an instance has run so far, counted on from its latest sync. */
export function uptimeOf({ model, syncedAt }: ISynced, now: number): number {
  return (model.uptime_seconds ?? 0) + (now - syncedAt) / 1000;
}

/** One event of a kernel, for those who react to it (notifications). */
export interface IPhaseEmission {
  event: IPhase;
  /** The kernel's start as of this event (its notebook, a failure's error). */
  start: IStart;
  /** Whether this page asked for the start to be cancelled. */
  cancelled: boolean;
}

export class ComputeState implements IDisposable {
  constructor(events: Event.IManager | null) {
    events?.stream.connect(this._onEvent, this);
    this._events = events;
    this._timer = window.setInterval(() => void this._tick(), 1000);
    void this.sync();
    void this._poll(false); // starts under way before this page opened
    this.gpuTypes().catch(() => undefined); // the lowest price, for the GPU buttons

  }

  /** Something changed: a phase, an instance, or one more second of uptime. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Each new progress event, once. */
  get phase(): ISignal<this, IPhaseEmission> {
    return this._phase;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    window.clearInterval(this._timer);
    this._events?.stream.disconnect(this._onEvent, this);
    Signal.clearData(this);
  }

  /** The latest start for the notebook at `path` this page has seen. */
  startFor(path: string): IStart | null {
    let latest: IStart | null = null;
    for (const start of this._starts.values()) {
      if (start.path === path && (!latest || start.receivedAt >= latest.receivedAt)) {
        latest = start;
      }
    }
    return latest;
  }

  /** The instance a kernel runs on, if the last sync listed it. */
  instance(kernelId: string | undefined): ISynced | null {
    return (kernelId && this._instances.get(kernelId)) || null;
  }

  /** Every start this page has seen, latest phase each. */
  get starts(): IStart[] {
    return [...this._starts.values()];
  }

  /** Every instance of this server's FlexAI kernels, as of the last sync. */
  get instances(): ISynced[] {
    return [...this._instances.values()];
  }

  /** The instances parked between kernels (`keep_alive`), as of the last sync. */
  get parked(): ISyncedParked[] {
    return this._parked;
  }

  /** The GPU types the platform offers (asked anew each time: availability changes). */
  async gpuTypes(): Promise<IGPUType[]> {
    const types = (await compute<{ gpu_types: IGPUType[] }>('available')).gpu_types;
    const startable = types.filter(t => t.kernel_name && t.available > 0);
    const lowest = Math.min(...startable.map(t => t.price_per_hour));
    this._lowestPrice = Number.isFinite(lowest) ? lowest : null;
    this._changed.emit();
    return types;
  }

  /** The lowest hourly price of a GPU a kernel can start on here now, as last asked. */
  get lowestPrice(): number | null {
    return this._lowestPrice;
  }

  /** Re-read the instances from the server. */
  async sync(): Promise<void> {
    if (this._syncing) {
      return this._syncing;
    }
    this._syncing = (async () => {
      try {
        const { instances, parked } = await compute<{
          instances: IInstance[];
          parked?: IParked[];
        }>('instances');
        const now = Date.now();
        this._instances = new Map(
          instances.map(model => [model.kernel_id, { model, syncedAt: now }])
        );
        this._parked = (parked ?? []).map(model => ({ model, syncedAt: now }));
        this._lastSync = now;
        this._changed.emit();
      } catch (error) {
        console.warn('FlexAI: cannot list the instances:', error);
      } finally {
        this._syncing = null;
      }
    })();
    return this._syncing;
  }

  /**
   * The notebook at `path` shut its kernel down while its first session was still being
   * created (JupyterLab then sends the server nothing until the boot ends): stop the
   * booting instance now, or as soon as the platform has named it.
   */
  cancelStartFor(path: string): void {
    const start = this.startFor(path);
    if (!start?.active) {
      return;
    }
    if (start.instanceId) {
      this._stopQuietly(start.instanceId, start.kernelId);
    } else {
      this._cancelWhenNamed.add(start.kernelId);
    }
  }

  private _stopQuietly(instanceId: string, kernelId: string): void {
    this.stop(instanceId, kernelId).catch(error =>
      console.warn(`FlexAI: cannot stop the booting instance ${instanceId}:`, error)
    );
  }

  /** Stop an instance (cancelling the start of kernel `kernelId` if it is under way); its
   * final cost. */
  async stop(instanceId: string, kernelId?: string): Promise<IStopped> {
    const cancelling = Boolean(kernelId && this._starts.get(kernelId)?.active);
    if (cancelling) {
      this._cancelled.add(kernelId!);
    }
    try {
      return await compute<IStopped>(`instance/${encodeURIComponent(instanceId)}/stop`, {
        method: 'POST'
      });
    } catch (error) {
      if (cancelling) {
        this._cancelled.delete(kernelId!); // nothing was stopped: a later failure is not ours
      }
      throw error;
    } finally {
      void this.sync();
    }
  }

  private _onEvent(_: Event.IManager, emission: Event.Emission): void {
    if (emission.schema_id !== SCHEMA_ID) {
      return;
    }
    const { kernel_id: kernelId, ...event } = emission as unknown as IPhase & {
      kernel_id: string;
    };
    this._record(kernelId, [...(this._history.get(kernelId) ?? []), event]);
  }

  /** Take a kernel's history (from an event or a poll); announce the events not seen yet. */
  private _record(kernelId: string, history: IPhase[], announce = true): void {
    const seen = this._history.get(kernelId)?.length ?? 0;
    if (history.length <= seen) {
      return;
    }
    this._history.set(kernelId, history);
    const state = reducePhases(history);
    if (!state) {
      return;
    }
    const start = { ...state, kernelId, receivedAt: Date.now() };
    this._starts.set(kernelId, start);
    if (this._cancelWhenNamed.has(kernelId) && (state.instanceId || !state.active)) {
      this._cancelWhenNamed.delete(kernelId);
      if (state.instanceId && state.active) {
        this._stopQuietly(state.instanceId, kernelId);
      }
    }
    const cancelled = this._cancelled.has(kernelId);
    for (const event of announce ? history.slice(seen) : []) {
      this._phase.emit({ event, start, cancelled });
    }
    if (!state.active) {
      void this.sync(); // a kernel is now ready, or gone
    }
    if (state.phase === 'ready' || state.phase === 'shut down') {
      this._cancelled.delete(kernelId);
    }
    this._changed.emit();
  }

  private async _tick(): Promise<void> {
    if (document.hidden) {
      return;
    }
    const now = Date.now();
    const active = [...this._starts.values()].filter(s => s.active);
    const quiet = (since: number) => now - since > POLL_AFTER * 1000;
    if (active.some(s => quiet(s.receivedAt)) && quiet(this._lastPoll)) {
      await this._poll();
    }
    const every = this._instances.size || active.length ? SYNC_BUSY : SYNC_IDLE;
    if (now - this._lastSync > every * 1000) {
      await this.sync();
    }
    this._changed.emit(); // elapsed time and uptime run on
  }

  private async _poll(announce = true): Promise<void> {
    this._lastPoll = Date.now();
    try {
      const { kernels } = await compute<{ kernels: IProgress[] }>('progress');
      for (const kernel of kernels) {
        this._record(kernel.kernel_id, kernel.phases, announce);
      }
    } catch (error) {
      console.warn('FlexAI: cannot poll the progress of starts:', error);
    }
  }

  private _disposed = false;
  private _events: Event.IManager | null;
  private _timer: number;
  private _history = new Map<string, IPhase[]>();
  private _starts = new Map<string, IStart>();
  private _instances = new Map<string, ISynced>();
  private _parked: ISyncedParked[] = [];
  private _cancelled = new Set<string>();
  private _cancelWhenNamed = new Set<string>();
  private _lastSync = 0;
  private _lastPoll = 0;
  private _lowestPrice: number | null = null;
  private _syncing: Promise<void> | null = null;
  private _changed = new Signal<this, void>(this);
  private _phase = new Signal<this, IPhaseEmission>(this);
}
