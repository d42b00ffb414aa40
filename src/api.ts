/**
 * The server extension's `/api/compute` REST API (docs/server.md), typed.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { IPhase } from './format';

/** The jupyter_events schema of the server extension's progress events. */
export const SCHEMA_ID = 'https://flex.ai/schemas/jupyter/compute/v1';

export interface IGPUType {
  name: string;
  memory_gb: number;
  price_per_hour: number;
  available: number;
  kernel_name: string | null;
}

export interface IInstance {
  kernel_id: string;
  kernel_name: string;
  kernel_state: string | null;
  instance_id: string | null;
  state: string;
  connected: boolean;
  reconnects: number;
  gpu_type: string;
  gpu_count: number;
  created_at: string | null;
  uptime_seconds: number | null;
  price_per_hour: number | null;
  cost_usd: number | null;
  limits: { max_hours: number | null; max_cost: number | null };
  phases: IPhase[];
  platform_error?: string;
}

/** An instance parked between kernels (`keep_alive`), waiting for the next to adopt it. */
export interface IParked {
  instance_id: string;
  state: 'parked';
  gpu_type: string;
  gpu_count: number;
  parked_until: string;
  seconds_left: number;
  created_at: string;
  uptime_seconds: number;
  price_per_hour: number;
  cost_usd: number;
}

export interface IHealth {
  ok: boolean;
  extension: { ok: boolean; version: string };
  platform: { ok: boolean; api_url?: string; gpu_types?: number; message?: string };
}

export interface IProgress {
  kernel_id: string;
  phase: string | null;
  phases: IPhase[];
}

export interface IStopped {
  kernel_id: string | null;
  instance_id: string;
  state: string;
  cost_usd: number | null;
}

/** An error answer of the API, its `message` readable as is. */
export class ComputeError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

/** Call `/api/compute/<path>`; the JSON answer, or a ComputeError with the server's message. */
export async function compute<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'api/compute', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ComputeError(`cannot reach the Jupyter server: ${String(error)}`, 0);
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: reported below with the status
  }
  if (!response.ok) {
    const message =
      body?.message ?? `the Jupyter server answered ${path} with HTTP ${response.status}`;
    throw new ComputeError(message, response.status);
  }
  return body as T;
}
