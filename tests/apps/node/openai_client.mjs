// openai_client.mjs — drives `megamoe serve` with the official OpenAI Node client (the npm package
// `openai`, pinned in package.json). tests/apps/openai_client_test.cpp starts the server and runs
// one check per process:
//
//   node openai_client.mjs BASE_URL MODEL CHECK      (BASE_URL like http://127.0.0.1:PORT/v1)
//
// CHECK is one of the names in `checks` below. Prints "ok CHECK" and exits 0 on success; prints
// what failed (an assertion or an unexpected exception, with its stack) and exits 1 otherwise.
import assert from 'node:assert/strict';
import OpenAI, {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  APIUserAbortError,
  BadRequestError,
  NotFoundError,
} from 'openai';

const [baseURL, model, check] = process.argv.slice(2);
if (!baseURL || !model || !check) {
  console.error('usage: node openai_client.mjs BASE_URL MODEL CHECK');
  process.exit(2);
}
// No retries: a retried 5xx would hide a server error; the client would otherwise retry twice.
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 120_000 });
const origin = new URL(baseURL).origin;

const user = (content) => [{ role: 'user', content }];

// Prometheus text: the value of one unlabelled sample.
async function metric(name) {
  const text = await (await fetch(`${origin}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  assert.ok(line, `metric ${name} missing`);
  return Number(line.slice(name.length + 1));
}

// Waits until nothing runs on the server (a cancelled request may take a step to leave).
async function waitIdle() {
  for (let i = 0; i < 100; ++i) {
    if ((await metric('megamoe_num_requests_running')) === 0 && (await metric('megamoe_num_requests_waiting')) === 0)
      return;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail('requests still running 5 s after their clients went away');
}

// Runs fn, which must reject with an instance of cls; returns the error.
async function expectError(cls, fn, what) {
  try {
    await fn();
  } catch (e) {
    assert.ok(e instanceof cls, `${what}: expected ${cls.name}, got ${e?.constructor?.name}: ${e?.message}`);
    return e;
  }
  assert.fail(`${what}: expected ${cls.name}, but the call succeeded`);
}

// Consumes a chat stream: the concatenated content and reasoning, the finish reason, the usage
// chunk, the logprobs entries, and the number of chunks.
async function drainChat(stream) {
  const out = { content: '', reasoning: '', finish: null, usage: null, logprobs: [], chunks: 0, role: null };
  for await (const chunk of stream) {
    ++out.chunks;
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) out.usage = chunk.usage;
    for (const c of chunk.choices) {
      assert.equal(c.index, 0);
      if (c.delta?.role) out.role = c.delta.role;
      if (c.delta?.content) out.content += c.delta.content;
      if (c.delta?.reasoning_content) out.reasoning += c.delta.reasoning_content;
      if (c.logprobs?.content) out.logprobs.push(...c.logprobs.content);
      if (c.finish_reason) out.finish = c.finish_reason;
    }
  }
  return out;
}

async function drainCompletion(stream) {
  const out = { text: [], finish: [], usage: null, chunks: 0 };
  for await (const chunk of stream) {
    ++out.chunks;
    assert.equal(chunk.object, 'text_completion');
    if (chunk.usage) out.usage = chunk.usage;
    for (const c of chunk.choices) {
      out.text[c.index] = (out.text[c.index] ?? '') + (c.text ?? '');
      if (c.finish_reason) out.finish[c.index] = c.finish_reason;
    }
  }
  return out;
}

function checkUsage(u) {
  assert.ok(u, 'no usage');
  assert.ok(Number.isInteger(u.prompt_tokens) && u.prompt_tokens > 0, `prompt_tokens ${u.prompt_tokens}`);
  assert.ok(Number.isInteger(u.completion_tokens) && u.completion_tokens > 0, `completion_tokens ${u.completion_tokens}`);
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
}

const tools = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'The weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  },
];

const checks = {
  // GET /v1/models through the client's paginated list.
  async models() {
    const page = await client.models.list();
    assert.deepEqual(page.data.map((m) => m.id), [model]);
    assert.equal(page.data[0].object, 'model');
    assert.ok(Number.isInteger(page.data[0].created));
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);   // the auto-paginating iterator
    assert.deepEqual(ids, [model]);
  },

  // Chat: whole, streamed with usage (the same text, the same usage), and through the client's
  // stream helper, which assembles the chunks into a ChatCompletion.
  async chat() {
    const params = { model, messages: user('What is the capital of France?'), max_tokens: 12, temperature: 0 };
    const full = await client.chat.completions.create(params);
    assert.equal(full.object, 'chat.completion');
    assert.equal(full.model, model);
    assert.ok(full.id.length > 0);
    assert.equal(full.choices.length, 1);
    const ch = full.choices[0];
    assert.equal(ch.message.role, 'assistant');
    assert.equal(typeof ch.message.content, 'string');
    assert.equal(typeof ch.message.reasoning_content, 'string');   // thinking is on by default
    assert.ok(['stop', 'length'].includes(ch.finish_reason), ch.finish_reason);
    checkUsage(full.usage);
    assert.ok(full.usage.completion_tokens <= 12);

    const s = await drainChat(
      await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } }),
    );
    assert.equal(s.role, 'assistant');
    assert.equal(s.content, ch.message.content);
    assert.equal(s.reasoning, ch.message.reasoning_content);
    assert.equal(s.finish, ch.finish_reason);
    assert.deepEqual(s.usage, full.usage);

    // Thinking off: everything is content, no reasoning_content.
    const noThink = { ...params, chat_template_kwargs: { thinking: false } };
    const plain = await client.chat.completions.create(noThink);
    assert.equal(plain.choices[0].message.reasoning_content, undefined);
    assert.ok(plain.choices[0].message.content.length > 0);

    // The client's stream helper assembles the chunks into a ChatCompletion, with events on the way.
    const helper = client.chat.completions.stream({ ...noThink, stream_options: { include_usage: true } });
    let deltas = '';
    helper.on('content', (delta) => { deltas += delta; });
    const final = await helper.finalChatCompletion();
    assert.equal(final.choices[0].message.content, plain.choices[0].message.content);
    assert.equal(deltas, plain.choices[0].message.content);
    assert.equal(final.choices[0].finish_reason, plain.choices[0].finish_reason);
    assert.deepEqual(final.usage, plain.usage);
    // A system prompt and a multi-turn history.
    const multi = await client.chat.completions.create({
      model,
      messages: [
        { role: 'system', content: 'You are terse.' },
        { role: 'user', content: 'Hi' },
        { role: 'assistant', content: 'Hello.' },
        { role: 'user', content: 'Bye' },
      ],
      max_completion_tokens: 3,
    });
    assert.ok(multi.usage.completion_tokens <= 3);
    assert.ok(multi.usage.prompt_tokens > full.usage.prompt_tokens - 10);
  },

  // Text completions: whole and streamed with usage, a token-id prompt, ignore_eos, n choices.
  async completions() {
    const params = { model, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, ignore_eos: true };
    const full = await client.completions.create(params);
    assert.equal(full.object, 'text_completion');
    assert.equal(full.model, model);
    assert.equal(full.choices[0].finish_reason, 'length');
    assert.equal(typeof full.choices[0].text, 'string');
    checkUsage(full.usage);
    assert.equal(full.usage.completion_tokens, 10);

    const s = await drainCompletion(
      await client.completions.create({ ...params, stream: true, stream_options: { include_usage: true } }),
    );
    assert.equal(s.text[0], full.choices[0].text);
    assert.equal(s.finish[0], 'length');
    assert.deepEqual(s.usage, full.usage);

    const ids = await client.completions.create({ ...params, prompt: [300, 1200, 45, 4000, 17, 990, 5], max_tokens: 4 });
    assert.equal(ids.usage.prompt_tokens, 7);
    assert.equal(ids.usage.completion_tokens, 4);

    const n = await client.completions.create({ ...params, n: 3, temperature: 0.8, seed: 5, max_tokens: 5 });
    assert.deepEqual(n.choices.map((c) => c.index), [0, 1, 2]);
    assert.equal(n.usage.completion_tokens, 15);   // every choice's tokens, the prompt once
    assert.equal(n.usage.prompt_tokens, full.usage.prompt_tokens);
    const ns = await drainCompletion(
      await client.completions.create({
        ...params, n: 3, temperature: 0.8, seed: 5, max_tokens: 5, stream: true, stream_options: { include_usage: true },
      }),
    );
    assert.deepEqual(ns.text, n.choices.map((c) => c.text));
    assert.deepEqual(ns.usage, n.usage);
  },

  // Tools: the request shapes the client sends (tools, tool_choice, an assistant turn with
  // tool_calls and a tool result) are accepted; tool_choice values that need constrained decoding
  // are refused with a 400 naming the field.
  async tools() {
    const params = { model, messages: user("What's the weather in Paris?"), tools, max_tokens: 6, temperature: 0 };
    const auto = await client.chat.completions.create({ ...params, tool_choice: 'auto' });
    const msg = auto.choices[0].message;
    assert.ok(['stop', 'length', 'tool_calls'].includes(auto.choices[0].finish_reason));
    for (const call of msg.tool_calls ?? []) {
      assert.equal(call.type, 'function');
      assert.equal(typeof call.function.name, 'string');
      assert.equal(typeof call.function.arguments, 'string');
    }
    const none = await client.chat.completions.create({ ...params, tool_choice: 'none' });
    assert.ok(none.usage.prompt_tokens < auto.usage.prompt_tokens, 'tool_choice none still rendered the tools');

    const streamed = await drainChat(
      await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } }),
    );
    assert.deepEqual(streamed.usage, auto.usage);

    const conv = await client.chat.completions.create({
      model,
      tools,
      max_tokens: 4,
      messages: [
        { role: 'user', content: 'Weather in Paris?' },
        {
          role: 'assistant',
          content: '',
          reasoning_content: 'I should call the tool.',
          tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } }],
        },
        { role: 'tool', tool_call_id: 'call_1', content: 'sunny, 21 C' },
      ],
    });
    assert.equal(conv.object, 'chat.completion');

    for (const tool_choice of ['required', { type: 'function', function: { name: 'get_weather' } }]) {
      const e = await expectError(BadRequestError, () => client.chat.completions.create({ ...params, tool_choice }),
                                  `tool_choice ${JSON.stringify(tool_choice)}`);
      assert.equal(e.status, 400);
      assert.equal(e.param, 'tool_choice');
    }
  },

  // Logprobs, chat and completions, whole and streamed: one entry per token, top alternatives,
  // the greedy token the most likely one, the bytes spelling the token.
  async logprobs() {
    const params = {
      model, messages: user('Say something.'), max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 3,
      chat_template_kwargs: { thinking: false },
    };
    const full = await client.chat.completions.create(params);
    const lp = full.choices[0].logprobs.content;
    assert.equal(lp.length, full.usage.completion_tokens);
    for (const t of lp) {
      assert.equal(t.top_logprobs.length, 3);
      assert.ok(t.logprob <= 0);
      assert.ok(Math.abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6, 'greedy token is not the most likely');
      assert.ok(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob);
      assert.equal(Buffer.from(t.bytes).toString('utf8'), t.token);
    }
    const s = await drainChat(await client.chat.completions.create({ ...params, stream: true }));
    assert.deepEqual(s.logprobs.map((t) => [t.token, t.logprob]), lp.map((t) => [t.token, t.logprob]));

    const c = await client.completions.create({
      model, prompt: 'The quick brown fox', max_tokens: 4, temperature: 0, ignore_eos: true, logprobs: 2,
    });
    const cl = c.choices[0].logprobs;
    assert.equal(cl.tokens.length, 4);
    assert.equal(cl.token_logprobs.length, 4);
    assert.equal(cl.text_offset.length, 4);
    for (let i = 0; i < 4; ++i) {
      const top = Object.values(cl.top_logprobs[i]);
      assert.equal(top.length, 2);
      assert.ok(Math.abs(cl.token_logprobs[i] - Math.max(...top)) < 1e-6);
      if (i) assert.ok(cl.text_offset[i] >= cl.text_offset[i - 1]);
    }
    await expectError(BadRequestError, () => client.chat.completions.create({ ...params, top_logprobs: 21 }), 'top_logprobs 21');
  },

  // Seeds: the same seed gives the same sampled text, different seeds differ, and choice i of n
  // samples with seed + i.
  async seeds() {
    const base = { model, prompt: 'Once upon a time', max_tokens: 12, temperature: 1.0, ignore_eos: true };
    const text = async (extra) => (await client.completions.create({ ...base, ...extra })).choices.map((c) => c.text);
    const a = await text({ seed: 1234 });
    assert.deepEqual(await text({ seed: 1234 }), a);
    const others = new Set([a[0]]);
    for (const seed of [1, 2, 3, 4]) others.add((await text({ seed }))[0]);
    assert.ok(others.size >= 3, `5 seeds gave only ${others.size} distinct texts`);
    const n = await text({ seed: 77, n: 2 });
    assert.equal(n[0], (await text({ seed: 77 }))[0]);
    assert.equal(n[1], (await text({ seed: 78 }))[0]);
    const chat = { model, messages: user('Tell me a joke.'), max_tokens: 8, temperature: 0.9, seed: 42 };
    const c1 = await client.chat.completions.create(chat);
    const c2 = await client.chat.completions.create(chat);
    assert.equal(c1.choices[0].message.content, c2.choices[0].message.content);
    assert.equal(c1.choices[0].message.reasoning_content, c2.choices[0].message.reasoning_content);
  },

  // Errors reach the client as its exception classes, with status, param and code.
  async errors() {
    let e = await expectError(NotFoundError, () => client.chat.completions.create({
      model: 'gpt-4', messages: user('x'), max_tokens: 2 }), 'unknown model');
    assert.equal(e.status, 404);
    assert.equal(e.code, 'model_not_found');
    assert.equal(e.param, 'model');
    assert.match(e.message, /gpt-4/);

    e = await expectError(BadRequestError, () => client.chat.completions.create({
      model, messages: user('x'), temperature: -1 }), 'temperature -1');
    assert.match(e.message, /temperature/);
    assert.equal(e.type, 'invalid_request_error');

    e = await expectError(BadRequestError, () => client.completions.create({
      model, prompt: 'x', max_tokens: 'ten' }), 'max_tokens "ten"');
    assert.equal(e.param, 'max_tokens');

    e = await expectError(BadRequestError, () => client.chat.completions.create({
      model, messages: [{ role: 'robot', content: 'x' }] }), 'role robot');
    assert.match(e.message, /robot/);

    e = await expectError(BadRequestError, () => client.completions.create({
      model, prompt: Array(1100).fill(100) }), 'prompt over the context');
    assert.match(e.message, /maximum context length is 1024 tokens/);

    e = await expectError(BadRequestError, () => client.completions.create({
      model, prompt: Array(1100).fill(100), stream: true }), 'streamed prompt over the context');
    assert.equal(e.status, 400);

    // 413 has no class of its own: the base APIError, with the status.
    e = await expectError(APIError, () => client.completions.create({ model, prompt: 'a'.repeat(70 * 1024) }), 'body too large');
    assert.equal(e.status, 413);
    assert.match(e.message, /too large/);

    e = await expectError(NotFoundError, () => client.post('/no/such/endpoint', { body: {} }), 'unknown endpoint');
    assert.equal(e.status, 404);
    e = await expectError(APIError, () => client.get('/chat/completions'), 'GET on a POST endpoint');
    assert.equal(e.status, 405);
    assert.equal(e.headers.get('allow'), 'POST');

    const closed = new OpenAI({ baseURL: 'http://127.0.0.1:1/v1', apiKey: 'unused', maxRetries: 0 });
    await expectError(APIConnectionError, () => closed.models.list(), 'closed port');

    // A request that takes longer than the client's timeout; the server cancels it.
    await expectError(APIConnectionTimeoutError, () => client.completions.create(
      { model, prompt: 'x', max_tokens: 400, ignore_eos: true }, { timeout: 200 }), 'client timeout');
    await waitIdle();

    const ok = await client.chat.completions.create({ model, messages: user('still there?'), max_tokens: 2 });
    assert.equal(ok.object, 'chat.completion');
  },

  // Abort mid-stream three ways (the stream's controller, leaving the loop, the caller's
  // AbortSignal on a whole request): each ends the client's side at once, and the server stops
  // generating for it. Counted, not timed: each of the three ends as "cancelled" on the server
  // (one it failed to cancel would run to its 400 tokens and end as "length").
  async abort() {
    const finished = (reason) => metric(`megamoe_requests_finished_total{reason="${reason}"}`);
    const cancelled0 = await finished('cancelled'), length0 = await finished('length');
    const long = { model, messages: user('Tell me a long story.'), max_tokens: 400, ignore_eos: true };

    const s1 = await client.chat.completions.create({ ...long, stream: true });
    let chunks = 0, finish = null;
    for await (const chunk of s1) {
      if (chunk.choices[0]?.finish_reason) finish = chunk.choices[0].finish_reason;
      if (++chunks === 4) s1.controller.abort();
    }
    // Aborting ends the iteration without an error and before the stream's end (events already
    // read from the socket with the 4th may still be yielded: how many is timing, not asserted).
    assert.ok(chunks >= 4 && chunks < 400, `${chunks} chunks after the abort at the 4th`);
    assert.equal(finish, null);

    const s2 = await client.completions.create({ model, prompt: 'Tell me a long story.', max_tokens: 400,
                                                 ignore_eos: true, stream: true });
    chunks = 0;
    for await (const chunk of s2) {
      assert.equal(chunk.object, 'text_completion');
      if (++chunks === 3) break;
    }

    // The whole request is aborted once the server runs it (so it cannot be refused unseen).
    await waitIdle();
    const ac = new AbortController();
    const pending = client.chat.completions.create(long, { signal: ac.signal });
    const caught = expectError(APIUserAbortError, () => pending, 'aborted whole request');
    for (let i = 0; i < 500 && (await metric('megamoe_num_requests_running')) < 1; ++i)
      await new Promise((r) => setTimeout(r, 20));
    ac.abort();
    await caught;

    await waitIdle();
    assert.equal((await finished('cancelled')) - cancelled0, 3, 'requests cancelled by their clients');
    assert.equal((await finished('length')) - length0, 0, 'aborted requests that ran to their length');

    const ok = await client.completions.create({ model, prompt: 'after', max_tokens: 3, ignore_eos: true });
    assert.equal(ok.usage.completion_tokens, 3);
  },

  // Concurrent streams, chat and completions mixed: every one completes with its usage, and
  // (greedy) each stream's text equals the same request run alone afterwards.
  async concurrent() {
    const N = 12;
    const req = (i) => (i % 2
      ? { kind: 'chat', model, messages: user(`Request number ${i}: count to ten.`), max_tokens: 8,
          temperature: 0, ignore_eos: true }
      : { kind: 'completion', model, prompt: `Request number ${i}: once upon a time`, max_tokens: 8,
          temperature: 0, ignore_eos: true });
    const run = async (i, stream) => {
      const { kind, ...body } = req(i);
      if (kind === 'chat') {
        if (!stream) {
          const r = await client.chat.completions.create(body);
          return { text: r.choices[0].message.reasoning_content + '|' + r.choices[0].message.content, usage: r.usage };
        }
        const s = await drainChat(
          await client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } }));
        return { text: s.reasoning + '|' + s.content, usage: s.usage };
      }
      if (!stream) {
        const r = await client.completions.create(body);
        return { text: r.choices[0].text, usage: r.usage };
      }
      const s = await drainCompletion(
        await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } }));
      return { text: s.text[0], usage: s.usage };
    };
    const together = await Promise.all(Array.from({ length: N }, (_, i) => run(i, true)));
    for (const [i, r] of together.entries()) {
      checkUsage(r.usage);
      assert.equal(r.usage.completion_tokens, 8, `stream ${i}`);
    }
    for (let i = 0; i < N; ++i) {
      const alone = await run(i, false);
      assert.equal(together[i].text, alone.text, `stream ${i}: batched text differs from its solo run`);
      assert.deepEqual(together[i].usage, alone.usage);
    }
  },
};

if (!(check in checks)) {
  console.error(`unknown check '${check}' (one of: ${Object.keys(checks).join(', ')})`);
  process.exit(2);
}
try {
  await checks[check]();
  console.log(`ok ${check}`);
} catch (e) {
  console.error(`FAILED ${check}: ${e?.stack ?? e}`);
  process.exit(1);
}
