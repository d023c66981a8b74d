"""Which instructions does SmolLM2-135M-Instruct follow when asked? The one-off probe that
picked fasteer's shipped instruction set (docs/instructions.md).

    python scripts/probe_instructions.py [name,name,...]  > benchmarks/results/instructions/probe.txt

16 requests written here (not the shipped splits), each answered greedily (96 new tokens)
with and without the instruction appended; per instruction: the share of answers its rule
accepts when asked, mean words, seconds, and the first answer. The "none" row also prints
each rule's share on the unasked answers. Rules here are the probe's quick versions; the
shipped checkers are in fasteer/evaluate/instructions.py.
"""
import re, sys, time, torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM, AutoTokenizer
from fasteer.models import packaged_model_path
p = packaged_model_path("smollm2")
tok = AutoTokenizer.from_pretrained(p); tok.padding_side="left"
model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
bases = ["Write a short paragraph about the water cycle.", "Explain how electric cars work.", "What are the benefits of reading books?",
 "Describe a typical day of a farmer.", "Give some advice for learning to cook.", "Why is sleep important?", "Tell me about honey bees.",
 "What should I pack for a camping trip?", "Explain what volcanoes are.", "Describe the moon.", "How can I save money?", "Write about the history of trains.",
 "What makes a good friend?", "Explain photosynthesis simply.", "Describe your favourite season.", "What is chess and how is it played?"]
from lingua import Language, LanguageDetectorBuilder
det = LanguageDetectorBuilder.from_languages(Language.FRENCH, Language.ENGLISH).build()
C = {
 "none": ("", lambda r: True),
 "french": (" Respond in French.", lambda r: det.detect_language_of(r)==Language.FRENCH),
 "include_remarkable": (' Make sure to include the word "remarkable".', lambda r: re.search(r"\bremarkable\b", r, re.I) is not None),
 "include_blue": (' Make sure to include the word "blue".', lambda r: re.search(r"\bblue\b", r, re.I) is not None),
 "exclude_important": (' Do not use the word "important".', lambda r: re.search(r"\bimportant\b", r, re.I) is None),
 "include_future": (' Make sure to include the word "future".', lambda r: re.search(r"\bfuture\b", r, re.I) is not None),
 "exclude_can": (' Do not use the word "can".', lambda r: re.search(r"\bcan\b", r, re.I) is None),
 "exclude_the": (' Do not use the word "the".', lambda r: re.search(r"\bthe\b", r, re.I) is None),
 "short": (" Answer in one sentence.", lambda r: len(r.split()) <= 30),
 "bullets": (" Answer with a bulleted list.", lambda r: len(re.findall(r"^\s*[-*•] ", r, re.M))>=2),
 "numbered": (" Answer with a numbered list.", lambda r: len(re.findall(r"^\s*\d+\. ", r, re.M))>=2),
 "quotes": (" Wrap your entire response in double quotation marks.", lambda r: r.strip().startswith('"') ),
 "title": (" Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.", lambda r: re.search(r"<<[^>]+>>", r) is not None),
 "caps": (" Your entire response should be in English, capital letters only.", lambda r: r.upper()==r),
 "start_sure": (' Start your answer with the word "Sure".', lambda r: r.strip().lower().startswith("sure")),
 "json": (" Wrap your entire output in JSON format.", lambda r: r.strip().startswith("{") or r.strip().startswith("```json")),
 "nocomma": (" Do not use any commas in your response.", lambda r: "," not in r),
 "ps": (" At the end of your response, please add a postscript starting with P.S.", lambda r: "P.S." in r),
 "highlight": (" Highlight at least 2 sections in your answer with markdown, i.e. *highlighted section*.", lambda r: len(re.findall(r"\*[^\n\*]+\*", r))>=2),
 "spanish": (" Respond in Spanish.", None),
}
names = sys.argv[1].split(",") if len(sys.argv)>1 else list(C)
for name in names:
    suffix, check = C[name]
    texts = [tok.apply_chat_template([{"role":"user","content":b+suffix}], tokenize=False, add_generation_prompt=True) for b in bases]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t=time.time()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id)
    resp = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    if check is None: check = C["none"][1]
    ok = [check(r) for r in resp]
    words = sum(len(r.split()) for r in resp)/len(resp)
    print(f"{name:20s} {sum(ok)/len(ok):.2f}  words {words:.0f}  {time.time()-t:.0f}s | {resp[0][:150]!r}", flush=True)
    if name=="none":
        for k,(s,c) in C.items():
            if c and k!="none": print("   base", k, sum(c(r) for r in resp)/len(resp))
