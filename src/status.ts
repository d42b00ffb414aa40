/**
 * The notebook's GPU at a glance: the phase of its kernel's start with the seconds so far
 * and a Cancel action, then "A100 · 0:12:34 · $0.40" while it runs (marked while the link
 * reconnects, warned before a limit acts). JupyterLab shows it in the status bar;
 * Notebook 7, which has none, in the notebook's toolbar.
 */
import { Notification } from '@jupyterlab/apputils';
import type { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import {
  costOf,
  formatCost,
  formatDuration,
  limitWarning,
  phaseLabel
} from './format';
import { findSpec } from './kernels';
import { type ComputeState, elapsedOf, type IStart, uptimeOf } from './state';

/** What the item shows for a notebook. */
export interface IView {
  text: string;
  title: string;
  mode: 'booting' | 'running' | 'none';
  warning: boolean;
  reconnecting: boolean;
  /** The booting start, for Cancel. */
  start?: IStart;
}

/** The notebook's GPU: its start under way, else the instance its kernel runs on. */
export function describe(
  panel: NotebookPanel | null,
  state: ComputeState,
  now: number,
  withGPU = true
): IView {
  const none: IView = { text: '', title: '', mode: 'none', warning: false, reconnecting: false };
  if (!panel) {
    return none;
  }
  const context = panel.sessionContext;
  const start = state.startFor(context.path);
  if (start?.active) {
    const spec = findSpec(context.specsManager.specs, undefined, context.kernelDisplayName);
    const elapsed = elapsedOf(start, now);
    const gpu = spec ? `${spec.gpuCount > 1 ? `${spec.gpuCount}× ` : ''}${spec.gpuType}` : 'GPU';
    const phase = `${phaseLabel(start.phase)}… ${elapsed} s`;
    return {
      ...none,
      mode: 'booting',
      text: withGPU ? `${gpu} · ${phase}` : phase,
      title:
        `The FlexAI kernel of ${context.path} is starting: ${phaseLabel(start.phase)} ` +
        `(${elapsed} s so far)` +
        (start.instanceId ? `, instance ${start.instanceId}.` : '.'),
      start
    };
  }
  const synced = state.instance(context.session?.kernel?.id);
  if (!synced || synced.model.state === 'deleted') {
    return none; // shutting down: the notification tells what it ran and cost
  }
  const { model } = synced;
  const uptime = uptimeOf(synced, now);
  const cost = model.price_per_hour === null ? null : costOf(model.price_per_hour, uptime);
  const gpu = `${model.gpu_count > 1 ? `${model.gpu_count}× ` : ''}${model.gpu_type}`;
  const parts = withGPU ? [gpu, formatDuration(uptime)] : [formatDuration(uptime)];
  if (cost !== null) {
    parts.push(formatCost(cost));
  }
  const warning = limitWarning(model, uptime);
  const reconnecting = !model.connected;
  if (reconnecting) {
    parts.push('reconnecting');
  }
  const title = [
    `Instance ${model.instance_id} (${model.state}), ` +
      (model.price_per_hour === null ? 'price unknown' : `$${model.price_per_hour}/h`) +
      `, running for ${formatDuration(uptime)}.`,
    reconnecting ? 'The SSH link to the instance is down; reconnecting.' : '',
    model.platform_error ? `The platform cannot be asked: ${model.platform_error}` : '',
    warning?.text ?? '',
    'Click to see all FlexAI instances.'
  ];
  return {
    ...none,
    mode: 'running',
    text: parts.join(' · '),
    title: title.filter(Boolean).join('\n'),
    warning: warning !== null,
    reconnecting
  };
}

/** The item itself, for whichever notebook `panel()` gives; beside the GPU button it leaves
 * the GPU type out (`withGPU` false). */
export class ComputeStatus extends Widget {
  constructor(
    private _state: ComputeState,
    private _panel: () => NotebookPanel | null,
    private _openInstances: () => void,
    private _withGPU = true
  ) {
    super();
    this.addClass('jp-FlexAI-status');
    this._label.className = 'jp-FlexAI-status-label';
    this._cancel.className = 'jp-FlexAI-cancel';
    this._cancel.textContent = 'Cancel';
    this.node.append(this._label, this._cancel);
    this._label.addEventListener('click', () => this._openInstances());
    this._cancel.addEventListener('click', event => {
      event.stopPropagation();
      void this._cancelStart();
    });
    _state.changed.connect(this.update, this);
    this.update();
  }

  /** Show the current notebook's state now (also called when the notebook changes). */
  update(): void {
    const view = describe(this._panel(), this._state, Date.now(), this._withGPU);
    this._view = view;
    this.node.dataset.mode = view.mode;
    this.node.classList.toggle('jp-mod-warning', view.warning);
    this.node.classList.toggle('jp-mod-reconnecting', view.reconnecting);
    this.node.hidden = view.mode === 'none';
    this._label.textContent = view.text;
    this.node.title = view.title;
    this._cancel.hidden = view.mode !== 'booting';
    const instanceId = view.start?.instanceId;
    this._cancel.disabled = !instanceId || this._cancelling === instanceId;
    this._cancel.title = instanceId
      ? `Stop the start and delete instance ${instanceId}`
      : 'Cancel is possible once the platform has answered the request';
  }

  private async _cancelStart(): Promise<void> {
    const start = this._view?.start;
    if (!start?.instanceId) {
      return;
    }
    this._cancelling = start.instanceId;
    this.update();
    try {
      await this._state.stop(start.instanceId, start.kernelId);
    } catch (error) {
      Notification.error(`The start could not be cancelled: ${(error as Error).message}`, {
        autoClose: false
      });
    } finally {
      this._cancelling = null;
      this.update();
    }
  }

  private _label = document.createElement('span');
  private _cancel = document.createElement('button');
  private _view: IView | null = null;
  private _cancelling: string | null = null;
}
