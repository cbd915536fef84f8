"""The demo's single page: two tabs (Compare, Results), plain HTML + a few lines of fetch()."""

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tunelab demo</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f6f9;color:#1d2733}
header{background:#12497a;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:center}
header h1{font-size:20px;margin:0}.tab{background:none;border:0;color:#cfe0f0;font-size:16px;cursor:pointer;padding:6px 10px}
.tab.on{color:#fff;border-bottom:3px solid #f0a030}main{padding:20px 24px;max-width:1200px}
.panel{display:none}.panel.on{display:block}label{font-weight:600;margin-right:8px}
textarea{width:100%;height:70px;font-size:15px;margin:8px 0}select,input{font-size:15px}
button.go{background:#12497a;color:#fff;border:0;padding:8px 18px;font-size:15px;border-radius:4px;cursor:pointer}
#outputs{display:flex;gap:12px;margin-top:16px;flex-wrap:wrap}.card{flex:1;min-width:240px;background:#fff;
border:1px solid #ccd;border-radius:6px;padding:12px}.card h3{margin:0 0 6px;font-size:15px}
.card pre{white-space:pre-wrap;font-size:14px}.lat{color:#666;font-size:13px}.err{color:#b00020}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ccd;padding:4px 10px;text-align:right}
td:first-child{text-align:left}img{max-width:560px;margin:12px 12px 0 0;background:#fff}
</style></head><body>
<header><h1>tunelab demo</h1><button class="tab on" data-tab="compare">Compare</button>
<button class="tab" data-tab="results">Results</button></header>
<main>
<section class="panel on" id="compare">
<p><label>Base model</label><select id="model"></select></p>
<p><label>Adapters</label><span id="adapters"></span></p>
<textarea id="prompt" placeholder="Type a prompt">Summarize the note: </textarea>
<p><label>max new tokens</label><input id="maxnew" type="number" value="32" min="1" max="256">
<button class="go" id="go">Generate</button></p>
<div id="outputs"></div></section>
<section class="panel" id="results"><div id="table">Loading…</div><div id="plots"></div></section>
</main>
<script>
const $=id=>document.getElementById(id);
const esc=s=>String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
document.querySelectorAll('.tab').forEach(b=>b.onclick=()=>{
  document.querySelectorAll('.tab,.panel').forEach(e=>e.classList.remove('on'));
  b.classList.add('on');$(b.dataset.tab).classList.add('on');if(b.dataset.tab==='results')loadResults();});
fetch('/api/options').then(r=>r.json()).then(o=>{
  $('model').innerHTML=o.models.map(m=>`<option>${esc(m)}</option>`).join('');
  $('adapters').innerHTML=o.adapters.length?o.adapters.map(a=>`<label style="font-weight:400">
    <input type="checkbox" value="${esc(a.name)}" checked> ${esc(a.name)}</label>`).join(' '):'none found';});
$('go').onclick=async()=>{
  const adapters=[...document.querySelectorAll('#adapters input:checked')].map(i=>i.value);
  $('outputs').innerHTML='<p>Generating…</p>';
  const r=await fetch('/api/generate',{method:'POST',headers:{'Content-Type':'application/json'},
    body:JSON.stringify({model:$('model').value,adapters,prompt:$('prompt').value,max_new_tokens:+$('maxnew').value})});
  const d=await r.json();
  $('outputs').innerHTML=d.error?`<p class="err">${esc(d.error)}</p>`:d.outputs.map(o=>`<div class="card">
    <h3>${esc(o.name)}</h3><pre>${esc(o.text)||'<i>(empty)</i>'}</pre><div class="lat">${o.latency_ms} ms</div></div>`).join('');};
let loaded=false;
async function loadResults(){if(loaded)return;loaded=true;
  const r=await fetch('/api/results');const d=await r.json();
  if(!r.ok){$('table').innerHTML=`<p class="err">${esc(d.error)}</p>`;return;}
  const f=(v,n)=>v==null?'–':(+v).toFixed(n);
  $('table').innerHTML=`<h2>${esc(d.experiment)}</h2><table><tr><th>method</th><th>train size</th><th>seeds</th>
    <th>score ± 95% CI</th><th>trainable params</th><th>peak MB</th><th>train s</th><th>latency ms</th>`+
    (d.price_per_hour!=null?`<th>cost @${d.price_per_hour}/h</th>`:'')+`</tr>`+
    d.rows.map(x=>`<tr><td>${esc(x.method)}</td><td>${x.train_size}</td><td>${x.seeds}</td>
    <td>${f(x.score,4)} ± ${f(x.score_ci95,4)}</td><td>${x.trainable_parameters.toLocaleString()}</td>
    <td>${f(x.peak_memory_mb,0)}</td><td>${f(x.train_seconds,0)}</td><td>${f(x.latency_ms,1)}</td>`+
    (d.price_per_hour!=null?`<td>${(+x.train_cost).toPrecision(4)}</td>`:'')+`</tr>`).join('')+'</table>';
  $('plots').innerHTML=Object.entries(d.plots).map(([k,v])=>`<img alt="${k}" src="data:image/png;base64,${v}">`).join('');}
</script></body></html>
"""
