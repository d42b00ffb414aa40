import { Widget } from '@lumino/widgets';

/** A dialog body for a problem: a headline, the fix first, then the whole message, wrapped. */
export function problemWidget(options: { title?: string; fix?: string; message: string }): Widget {
  const node = document.createElement('div');
  node.className = 'jp-FlexAI-problem';
  const add = (className: string, text?: string) => {
    if (text) {
      const p = node.appendChild(document.createElement('p'));
      p.className = className;
      p.textContent = text;
    }
  };
  add('jp-FlexAI-problem-title', options.title);
  add('jp-FlexAI-fix', options.fix);
  add('jp-FlexAI-message', options.message);
  return new Widget({ node });
}
