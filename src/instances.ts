/**
 * All of this server's FlexAI instances, with uptime and cost so far, each with Stop
 * (starts under way too, with Cancel): a dialog opened from the status item or the
 * command palette.
 */
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  costOf,
  formatCost,
  formatDuration,
  formatPrice,
  notebookOf,
  phaseLabel
} from './format';
import { type ComputeState, elapsedOf, uptimeOf } from './state';

/** Open the instances dialog; it follows the state while open. */
export async function showInstances(state: ComputeState): Promise<void> {
  const body = new InstancesBody(state);
  void state.sync();
  await showDialog({
    title: 'FlexAI GPU instances of this server',
    body,
    buttons: [Dialog.okButton({ label: 'Close' })],
    hasClose: true
  });
  body.dispose();
}

class InstancesBody extends Widget {
  constructor(private _state: ComputeState) {
    super();
    this.addClass('jp-FlexAI-instances');
    _state.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._state.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const now = Date.now();
    const rows: { cells: string[]; instanceId: string | null; kernelId?: string }[] = [];
    let total = 0;
    let hourly = 0;
    for (const start of this._state.starts.filter(s => s.active)) {
      const elapsed = elapsedOf(start, now);
      rows.push({
        cells: ['…', start.path ?? start.kernelId, `${phaseLabel(start.phase)} (${elapsed} s)`, '', ''],
        instanceId: start.instanceId,
        kernelId: start.kernelId
      });
    }
    for (const synced of this._state.instances) {
      const { model } = synced;
      const uptime = uptimeOf(synced, now);
      const price = model.price_per_hour;
      const cost = price === null ? null : costOf(price, uptime);
      total += cost ?? 0;
      hourly += price ?? 0;
      const notebook = notebookOf(model.phases) ?? `kernel ${model.kernel_id.slice(0, 8)}`;
      const state = model.connected ? model.state : `${model.state}, reconnecting`;
      rows.push({
        cells: [
          `${model.gpu_count > 1 ? `${model.gpu_count}× ` : ''}${model.gpu_type}`,
          notebook,
          state,
          formatDuration(uptime),
          cost === null ? '?' : `${formatCost(cost)} at ${formatPrice(price ?? 0)}`
        ],
        instanceId: model.instance_id,
        kernelId: model.kernel_id
      });
    }
    for (const { model, syncedAt } of this._state.parked) {
      const passed = (now - syncedAt) / 1000;
      const cost = model.cost_usd + costOf(model.price_per_hour, passed);
      total += cost;
      hourly += model.price_per_hour;
      rows.push({
        cells: [
          `${model.gpu_count > 1 ? `${model.gpu_count}× ` : ''}${model.gpu_type}`,
          'parked for the next kernel',
          `parked, ${formatDuration(Math.max(0, model.seconds_left - passed))} left`,
          formatDuration(model.uptime_seconds + passed),
          `${formatCost(cost)} at ${formatPrice(model.price_per_hour)}`
        ],
        instanceId: model.instance_id
      });
    }
    const table = document.createElement('table');
    table.className = 'jp-FlexAI-instanceTable';
    const head = table.createTHead().insertRow();
    for (const label of ['GPU', 'Notebook', 'State', 'Uptime', 'Cost so far', '']) {
      head.appendChild(document.createElement('th')).textContent = label;
    }
    const body = table.createTBody();
    for (const row of rows) {
      const tr = body.insertRow();
      tr.dataset.instance = row.instanceId ?? '';
      for (const text of row.cells) {
        tr.insertCell().textContent = text;
      }
      const button = document.createElement('button');
      button.className = 'jp-Button jp-mod-styled jp-mod-warn jp-FlexAI-stop';
      const stopping = row.instanceId !== null && this._stopping.has(row.instanceId);
      button.textContent = stopping ? 'Stopping…' : 'Stop';
      button.disabled = !row.instanceId || stopping;
      button.title = !row.instanceId
        ? 'The platform has not answered the request yet'
        : row.kernelId
          ? `Shut the kernel down and delete instance ${row.instanceId}`
          : `Delete parked instance ${row.instanceId}`;
      button.addEventListener('click', () => void this._stop(row.instanceId!, row.kernelId));
      tr.insertCell().appendChild(button);
    }
    const summary = document.createElement('p');
    summary.className = 'jp-FlexAI-summary';
    summary.textContent = rows.length
      ? `${this._state.instances.length} running` +
        (this._state.parked.length ? `, ${this._state.parked.length} parked` : '') +
        `, ${formatPrice(hourly)} in all; ${formatCost(total)} so far.`
      : 'No FlexAI instance runs for this server.';
    this.node.replaceChildren(...(rows.length ? [table] : []), summary);
  }

  private async _stop(instanceId: string, kernelId?: string): Promise<void> {
    this._stopping.add(instanceId);
    this._render();
    try {
      await this._state.stop(instanceId, kernelId);
    } catch (error) {
      Notification.error(`Instance ${instanceId} was not stopped: ${(error as Error).message}`, {
        autoClose: false
      });
    } finally {
      this._stopping.delete(instanceId);
      this._render();
    }
  }

  private _stopping = new Set<string>();
}
