// The Templates browser lists a custom pack's templates in the server's directory order (ComfyUI
// 0.3.75 reads no index for them): put ours in the order of scripts/make_workflows.py, the demo
// that runs out of the box first. Templates not in the list (added by hand) follow, by name.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { TEMPLATE_ORDER } from "./template_order.js";

function ordered(names) {
  const rank = (n) => { const i = TEMPLATE_ORDER.indexOf(n); return i < 0 ? TEMPLATE_ORDER.length : i; };
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

app.registerExtension({
  name: "DynamiCrafter.TemplateOrder",
  async setup() {
    const list = api.getWorkflowTemplates.bind(api);
    api.getWorkflowTemplates = async () => {
      const byPack = await list();
      for (const [pack, names] of Object.entries(byPack)) {
        if (names.some((n) => TEMPLATE_ORDER.includes(n))) byPack[pack] = ordered(names);
      }
      return byPack;
    };
  },
});
